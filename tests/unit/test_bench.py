"""The benchmark helpers that need no process: tables, median summaries, phase times read from
an online manifest, and the benchmark pairs (what the peer reads is what our pipeline trains on).

The benchmarks themselves run in tests/e2e/test_bench_smoke.py; their FLOP formula is tested in
test_modelspec.py. No timing is asserted anywhere: these check what the numbers mean. The TRL
peer's runner (run in TRL's own environment) is checked here for what needs no TRL: its step
arithmetic and that it imports nothing of ours. The GPU-path modes run here at their CPU size:
``attention`` (the per-sequence SDPA path against its dense masked reference, fp32; the CUDA
backends reported as skipped) and ``host-syncs`` (a "needs CUDA" line, exit status 0).
"""

import ast
import json

import pytest

from selm_mcore.bench.common import format_table, median_summary
from selm_mcore.bench.pairs import write_benchmark_pairs
from selm_mcore.bench.phases import phase_times
from selm_mcore.bench.trl_runner import step_deltas
from selm_mcore.data.tokenize import PreferenceDataset
from selm_mcore.loop.runner import Manifest


def test_phase_times_read_the_online_manifest(tmp_path):
    manifest = Manifest(tmp_path / "manifest.json", {"online": {"rounds": 1}})
    for name, seconds in [
        ("round1/export", 1.5),
        ("round1/generate", 10.0),
        ("round1/rank", 2.0),
        ("round1/refpass", 3.0),
        ("round1/train", 20.0),
        ("final/generate", 4.0),
    ]:
        manifest.record(name, name.replace("/", "_"), "0" * 64, seconds)
    rows = {r["round"]: r for r in phase_times(tmp_path)}
    assert rows["round1"]["generate"] == 10.0 and rows["round1"]["train"] == 20.0
    assert rows["round1"]["total"] == pytest.approx(36.5)
    assert rows["final"] == {"round": "final", "generate": 4.0, "total": 4.0}
    json.dumps(rows)  # the JSON output must serialise


def test_median_summary_and_table():
    summary = median_summary([{"a": 1.0}, {"a": 5.0}, {"a": 2.0}, {"a": None}], ["a"])
    assert summary["a"] == 2.0 and summary["a_all"] == [1.0, 5.0, 2.0]
    table = format_table(
        [{"name": "ours", "x": 1234.5}, {"name": "trl", "x": None}],
        [("name", "impl", ""), ("x", "tok/s", ".0f")],
    )
    lines = table.splitlines()
    assert lines[0].split() == ["impl", "tok/s"]
    assert lines[2].split() == ["ours", "1234"] and lines[3].split() == ["trl", "-"]


def test_benchmark_pairs_carry_the_pipelines_token_ids(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = tmp_path / "pairs.jsonl"
    write_benchmark_pairs(path, tokenizer, [(40, 30, 20, 25)] * 6)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    dataset = PreferenceDataset.from_file(path, tokenizer, max_length=1024, max_prompt_length=512)
    assert dataset.has_yref and len(dataset) == 6
    for row, example in zip(rows, dataset.examples):
        # What the peer reads is exactly what our pipeline trains on.
        assert row["prompt_ids"] == list(example.prompt_ids)
        assert row["chosen_ids"] == list(example.chosen_ids)
        assert row["rejected_ids"] == list(example.rejected_ids)
        assert row["chosen_ids"][-1] == tokenizer.eos_token_id
        # Lengths land near the targets (random word tokens re-encode to ~one token each).
        assert abs(len(example.prompt_ids) - 40) <= 3
        assert abs(len(example.chosen_ids) - 30) <= 3
        assert abs(len(example.rejected_ids) - 20) <= 3
        assert abs(len(example.yref_ids) - 25) <= 3


def test_realistic_profile_is_long_tailed_within_its_bounds():
    import statistics

    from selm_mcore.bench.pairs import REALISTIC_PROMPT, REALISTIC_RESPONSE, pair_lengths

    lengths = pair_lengths(
        "realistic",
        2000,
        prompt_tokens=0,
        chosen_tokens=0,
        rejected_tokens=0,
        with_yref=True,
        scale=1.0,
        seed=0,
    )
    prompts = [p for p, *_ in lengths]
    responses = [r for _, *rs in lengths for r in rs]
    assert abs(statistics.median(prompts) - REALISTIC_PROMPT["median"]) < 15
    assert abs(statistics.median(responses) - REALISTIC_RESPONSE["median"]) < 25
    assert max(prompts) == REALISTIC_PROMPT["high"]  # the tail reaches the cap
    assert all(p + max(rs) <= REALISTIC_RESPONSE["total"] for p, *rs in lengths)
    assert statistics.mean(prompts) > statistics.median(prompts)  # skewed to the right
    half = pair_lengths(
        "realistic",
        2000,
        prompt_tokens=0,
        chosen_tokens=0,
        rejected_tokens=0,
        with_yref=False,
        scale=0.5,
        seed=0,
    )
    assert all(y == 0 for *_, y in half)
    assert max(p for p, *_ in half) == REALISTIC_PROMPT["high"] // 2
    assert all(p + max(c, r) <= REALISTIC_RESPONSE["total"] // 2 for p, c, r, _ in half)


def test_trl_runner_measures_the_steps_after_the_warm_up():
    # (time, tokens, padded tokens) at the end of 4 optimizer steps
    ends = [(1.0, 10, 12), (3.0, 25, 30), (6.0, 45, 52), (10.0, 70, 80)]
    assert step_deltas(ends, 1) == ([2.0, 3.0, 4.0], [15, 20, 25], [18, 22, 28])
    assert step_deltas(ends, 2) == ([3.0, 4.0], [20, 25], [22, 28])


def test_trl_runner_imports_nothing_of_ours():
    """It runs in TRL's environment, where selm_mcore is not installed."""
    import selm_mcore.bench.compare as compare

    imported = []
    for node in ast.walk(ast.parse(compare.TRL_RUNNER.read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
    assert "trl" in imported and not [m for m in imported if m.split(".")[0] == "selm_mcore"]
    assert compare.TRL_SETUP_SCRIPT.is_file()


def _bench(*argv: str):
    """``selm bench ARGV``'s parsed arguments."""
    import argparse

    from selm_mcore.bench import add_arguments

    parser = argparse.ArgumentParser(prog="selm bench")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_attention_mode_on_cpu_measures_the_sdpa_path_against_the_dense_reference(tmp_path, capsys):
    import torch

    from selm_mcore.bench import main

    if torch.cuda.is_available():
        pytest.skip("the CPU size of the mode")
    out = tmp_path / "attention.json"
    args = _bench(
        "attention", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json", str(out)
    )
    assert main(args) == 0
    result = json.loads(out.read_text())
    rows = {row["backend"]: row for row in result["rows"]}
    assert sorted(rows) == ["dense", "sdpa"] and result["dtype"] == "fp32"
    assert result["skipped"] == {"varlen": "needs CUDA", "flash": "needs CUDA"}
    assert rows["sdpa"]["max_abs_error_out"] < 1e-5
    assert rows["sdpa"]["max_abs_error_grad"] < 1e-5
    assert all(row["forward_ms"] > 0 and row["forward_backward_ms"] > 0 for row in rows.values())
    assert result["groups"] == 3 and result["tokens"] < result["row_tokens"]  # padding too
    printed = capsys.readouterr().out
    assert "max |err| out" in printed and "varlen: skipped (needs CUDA)" in printed


def test_host_syncs_mode_without_cuda_says_so(tmp_path, capsys):
    import torch

    from selm_mcore.bench import main
    from selm_mcore.bench.host_syncs import SKIP_LINE

    if torch.cuda.is_available():
        pytest.skip("the CPU behaviour of the mode")
    out = tmp_path / "syncs.json"
    assert main(_bench("host-syncs", "--threads", "1", "--json", str(out))) == 0
    assert SKIP_LINE in capsys.readouterr().out
    assert json.loads(out.read_text())["skipped"] == "needs CUDA"
