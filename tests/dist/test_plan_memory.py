"""The layout planner against the real tensors of a training run at TP2 x DP2 (4 gloo ranks):
each rank trains one step of the tiny Llama through the trainer's step (``selm bench
plan-check``) and reports the bytes of its parameters, DDP gradient buffers and optimizer state
and the peak of the tensors autograd saved, beside what ``selm_mcore.plan`` predicts for it."""

from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(600)
def test_planner_matches_the_tensors_of_a_tp2_dp2_run(tmp_path):
    from launch import run_distributed

    out = tmp_path / "plan_check.json"
    run_distributed(
        "selm_mcore.cli",
        4,
        module=True,
        timeout_s=540,
        args=[
            "bench",
            "plan-check",
            "--threads",
            "1",
            "--set",
            "parallel.tp=2",
            "--set",
            "train.global_batch_size=8",
            "--set",
            "data.pack_tokens=512",
            "--set",
            "model.dtype=bf16",
            "--json",
            out,
        ],
    )
    result = json.loads(out.read_text())
    assert (result["tp"], result["pp"], result["dp"], result["impl"]) == (2, 1, 2, "cpu")
    ranks = result["ranks"]
    assert sorted((r["tp_rank"], r["dp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:
        measured, predicted = r["measured"], r["predicted"]
        # Megatron's buffers are replayed exactly (padding, fp32 norms, DP shards)
        for key in ("params", "grads", "optimizer"):
            assert measured[key] == pytest.approx(predicted[key], rel=0.01), (r["rank"], key)
        # the activation inventory (docs/plan.md: within 15% required, ~0.1% measured)
        assert measured["activations"] == pytest.approx(predicted["activations"], rel=0.05)
        # DP shards the optimizer: half of a bf16 model's 12 bytes per parameter each
        assert measured["optimizer"] < 0.55 * 6 * measured["params"]
