"""The GPU training paths that run on CPU over gloo: overlapped DP communication, optimizer-state
formats with torch AdamW and a FusedAdam stand-in, activation recompute choices.

One tiny random Llama (4 layers, hidden 64, vocab 256), small gradient buckets so the overlapped
path works bucket by bucket (``tests/dist/optimizer_worker.py``):

* DP2 and PP2 x VPP2 x DP2: three steps with the DP reduce-scatter / all-gather overlapped
  (Megatron's no_sync / grad_sync / param_sync hooks) equal the synchronous steps; right after a
  step the weights are stale until ``sync_params`` (the deferred all-gather), which makes them
  equal;
* DP2, torch AdamW and ``FusedAdamLike`` (TE FusedAdam's state layout and state_dict, with
  Megatron's TE-optimizer branches on), each in the dp_reshardable and fully_reshardable
  formats, and torch AdamW forced to its fused kernel (dp_reshardable): save after step 2, load
  into a fresh model + optimizer, and step 3 equals the uninterrupted step 3 exactly; the loaded
  exp_avg / exp_avg_sq equal the saved ones; the fused state carries no ``step`` key (its step
  is in the param groups), torch's has one step tensor per parameter; torch AdamW runs foreach
  on CPU (fused on CUDA) and keeps its kernel across a load of a state saved with other flags.
  With several buckets this also guards the fully_reshardable save against Megatron's
  bucket-padding offset bug;
* model.recompute none / selective / full give identical log-probs and gradients, unpacked and
  packed;
* packed micro-batches through the schedule's forward and backward (4 layers, full recompute):
  one attention plan is built per micro-batch, at collation, none in the schedule, and every
  layer's attention reads its micro-batch's plan (twice: forward and recompute).

Tolerance for overlap on/off: 1e-5 relative. The sums run in another bucket order in fp32; how far
that moves a step depends on the CPU's kernels (1.05e-6 in the gradient norm on an AVX-512 Xeon); a
bucket left unreduced moves it by far more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launch import results, run_distributed

DIST_DIR = Path(__file__).resolve().parent
RTOL = 1e-5


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1.0)


def assert_overlap_equal(result: dict, vpp: bool) -> None:
    off, on = result["off"], result["on"]
    for step_off, step_on in zip(off["steps"], on["steps"], strict=True):
        assert _close(step_off["grad_norm"], step_on["grad_norm"]), (step_off, step_on)
        assert len(step_off["losses"]) == len(step_on["losses"])
        assert all(_close(a, b) for a, b in zip(step_off["losses"], step_on["losses"]))
    assert _close(off["checksum"], on["checksum"])
    assert off["stale_checksum"] == off["checksum"]  # synchronous all-gather in the step
    assert on["stale_checksum"] != on["checksum"]  # deferred to the next forward ...
    assert on["hooks"] == {"no_sync_func": True, "grad_sync_func": True, "param_sync_func": vpp}
    assert off["hooks"] == dict.fromkeys(off["hooks"], False)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizer_state")
    modes = ["overlap:1:1:none", "recompute", "plan", "state:torch-fused:dp_reshardable"] + [
        f"state:{kind}:{fmt}"
        for kind in ("torch", "fused")
        for fmt in ("dp_reshardable", "fully_reshardable")
    ]
    outs = run_distributed(DIST_DIR / "optimizer_worker.py", 2, [root, *modes], timeout_s=400)
    return [rank[0] for rank in results(outs)]


@pytest.mark.timeout(600)
def test_overlapped_dp_communication_equals_synchronous_at_dp2(dp2):
    for rank in dp2:
        result = rank["overlap:1:1:none"]
        assert result["on"]["buckets"] > 1 and result["off"]["buckets"] == 1
        assert_overlap_equal(result, vpp=False)


@pytest.mark.timeout(600)
def test_overlapped_dp_communication_with_interleaved_pipeline(tmp_path):
    outs = run_distributed(
        DIST_DIR / "optimizer_worker.py", 4, [tmp_path, "overlap:1:2:2"], timeout_s=400
    )
    per_rank = [rank[0]["overlap:1:2:2"] for rank in results(outs)]
    for result in per_rank:
        assert_overlap_equal(result, vpp=True)
    assert sum(bool(r["on"]["steps"][0]["losses"]) for r in per_rank) == 2  # last stage x DP2


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "kind, fmt",
    [
        ("torch", "dp_reshardable"),
        ("torch", "fully_reshardable"),
        ("torch-fused", "dp_reshardable"),
        ("fused", "dp_reshardable"),
        ("fused", "fully_reshardable"),
    ],
)
def test_optimizer_state_round_trip(dp2, kind, fmt):
    for rank in dp2:
        result = rank[f"state:{kind}:{fmt}"]
        assert result["resumed"] == result["uninterrupted"]
        book = result["bookkeeping"]
        assert book["moments_nonzero"] and book["moments_max_diff"] == 0.0
        if kind == "fused":
            assert book["inner"] == ["FusedAdamLike"]
            assert book["state_keys"] == ["exp_avg", "exp_avg_sq"]  # no "step" key
            assert book["group_steps"] == [2]
            continue
        assert book["inner"] == ["AdamW"]
        assert book["per_param_steps"] == [2.0]
        assert book["distinct_step_tensors"] == book["num_states"] > 0
        # (fused, foreach): foreach on CPU as built, kept although the state was saved with
        # the other flags; the forced fused kernel likewise
        expected = [[True, False]] if kind == "torch-fused" else [[False, True]]
        assert book["built_kernels"] == book["loaded_kernels"] == expected


@pytest.mark.timeout(600)
def test_attention_plan_built_once_per_micro_batch(dp2):
    for rank in dp2:
        result = rank["plan"]
        assert result["micro_batches"] == 3 and result["layers"] == 4
        assert result["built_at_collation"] == 3 and result["built_in_schedule"] == 0
        # every layer read its micro-batch's plan in the forward and again in the recompute
        assert result["reads_per_plan"] == [2 * 4] * 3
        assert result["reads_of_other_plans"] == 0
        assert result["gradient_norm"] > 0


@pytest.mark.timeout(600)
def test_recompute_choices_give_identical_gradients(dp2):
    result = dp2[0]["recompute"]
    for layout in ("unpacked", "packed"):
        assert result[f"{layout}/none"]["granularity"] is None
        assert result[f"{layout}/selective"]["granularity"] == "selective"
        assert result[f"{layout}/selective"]["checkpoint_core_attention"]
        assert result[f"{layout}/full"]["granularity"] == "full"
        for mode in ("selective", "full"):
            assert result[f"{layout}/{mode}"]["max_abs_diff"] <= 1e-6
