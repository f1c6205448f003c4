"""The optimizer-state path of selm_mcore.mcore.optim without processes.

* ``FusedAdamLike`` (tests/support), the stand-in for TE's FusedAdam, is AdamW (checked against
  torch's) and, like TE's, refuses a ``step`` key in its state; that key is what the
  unconditional Adam-state prefill used to add, so a resume with TE's FusedAdam failed.
* The prefill happens for torch Adam/AdamW only; a fused Adam's state is left to Megatron (or,
  before any step, zero-filled without a step key) and its state_dict still works.
* The optimizer-state format metadata, the refusal of a dp_reshardable state at another layout,
  and the trainer's choice of format: dp_reshardable inside a round, fully reshardable last.
* The bucket-padded layout the fully_reshardable save is given (Megatron's offset bug).
The Megatron round trips (DP2, both optimizers, both formats) are in
tests/dist/test_overlap_optimizer_state.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fused_adam_like import FusedAdamLike

from selm_mcore.config.io import load_config
from selm_mcore.mcore.optim import (
    DP_RESHARDABLE,
    FULLY_RESHARDABLE,
    OptimizerStateError,
    _bucket_padded,
    check_optimizer_state_layout,
    prefill_adam_state,
    sharding_metadata,
    uses_torch_adam,
    zero_fused_adam_state,
)
from selm_mcore.train.trainer import step_checkpoint_reshardable


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(5, 3, generator=gen).requires_grad_(),
        torch.randn(4, generator=gen).requires_grad_(),
    ]


def _set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_fused_adam_like_is_adamw():
    ours, reference = _params(), _params()
    fused = FusedAdamLike(ours, lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1)
    for step in range(5):
        _set_grads(ours, step)
        _set_grads(reference, step)
        fused.step()
        adamw.step()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert fused.param_groups[0]["step"] == 5 and set(fused.state[ours[0]]) == {
        "exp_avg",
        "exp_avg_sq",
    }


def test_fused_adam_state_dict_refuses_a_step_key():
    params = _params()
    fused = FusedAdamLike(params)
    _set_grads(params, 0)
    fused.step()
    assert set(fused.state_dict()["state"][0]) == {"exp_avg", "exp_avg_sq"}
    fused.state[params[0]]["step"] = torch.tensor(1.0)  # what a torch-style prefill adds
    with pytest.raises(KeyError, match="step"):
        fused.state_dict()


def test_adam_state_prefill_only_for_torch_adam():
    torch_side = SimpleNamespace(optimizer=torch.optim.AdamW(_params()))
    fused_side = SimpleNamespace(optimizer=FusedAdamLike(_params()))
    assert uses_torch_adam(torch_side) and not uses_torch_adam(fused_side)
    assert uses_torch_adam(SimpleNamespace(chained_optimizers=[torch_side, torch_side]))
    assert not uses_torch_adam(SimpleNamespace(chained_optimizers=[torch_side, fused_side]))

    prefill_adam_state(torch_side)
    states = list(torch_side.optimizer.state.values())
    assert len(states) == 2 and all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in states)
    assert all(float(s["step"]) == 0.0 and not s["exp_avg"].any() for s in states)

    prefill_adam_state(fused_side)  # left to Megatron: nothing added
    assert not any(fused_side.optimizer.state.values())
    fused_side.optimizer.state_dict()


def test_fused_adam_zero_state_before_a_step_equals_its_own_first_step():
    params, reference = _params(), _params()
    zeroed = SimpleNamespace(optimizer=FusedAdamLike(params, lr=1e-2))
    zero_fused_adam_state(zeroed)
    states = list(zeroed.optimizer.state.values())
    assert all(set(s) == {"exp_avg", "exp_avg_sq"} and not s["exp_avg_sq"].any() for s in states)
    zeroed.optimizer.state_dict()  # saveable: no step key
    fresh = FusedAdamLike(reference, lr=1e-2)
    _set_grads(params, 0)
    _set_grads(reference, 0)
    zeroed.optimizer.step()
    fresh.step()
    for a, b in zip(params, reference):
        assert torch.equal(a, b)


def test_sharding_metadata():
    assert sharding_metadata(DP_RESHARDABLE) == {"distrib_optim_sharding_type": "dp_reshardable"}
    assert sharding_metadata(FULLY_RESHARDABLE) == {
        "distrib_optim_sharding_type": "fully_reshardable",
        "distrib_optim_fully_reshardable_mem_efficient": True,
    }
    with pytest.raises(ValueError, match="fully_sharded_model_space"):
        sharding_metadata("fully_sharded_model_space")


def test_dp_reshardable_state_loads_only_at_its_layout():
    saved = {"tp": 2, "pp": 2, "vpp": None, "grad_bucket_size": 40_000_000}
    check_optimizer_state_layout("ckpt", DP_RESHARDABLE, saved, dict(saved))  # dp is free
    with pytest.raises(
        OptimizerStateError,
        match=r"ckpt holds the optimizer state in the dp_reshardable format.*"
        r"tp: saved 2, now 1, pp: saved 2, now 1.*parallel.tp=2 "
        r"parallel.pp=2 parallel.vpp=None.*"
        r"train.reshardable_checkpoints=true",
    ):
        check_optimizer_state_layout("ckpt", DP_RESHARDABLE, saved, {**saved, "tp": 1, "pp": 1})
    with pytest.raises(OptimizerStateError, match="grad_bucket_size: saved 40000000, now None"):
        check_optimizer_state_layout(
            "ckpt", DP_RESHARDABLE, saved, {**saved, "grad_bucket_size": None}
        )
    # A fully reshardable state loads anywhere.
    check_optimizer_state_layout("ckpt", FULLY_RESHARDABLE, saved, {**saved, "tp": 1})


@pytest.mark.parametrize(
    "step, total, every, expected",
    [(20, 40, False, False), (40, 40, False, True), (20, 40, True, True)],
)
def test_trainer_saves_in_round_checkpoints_dp_reshardable_and_the_last_fully(
    step, total, every, expected
):
    cfg = load_config(None, [f"train.reshardable_checkpoints={str(every).lower()}"])
    assert step_checkpoint_reshardable(cfg, step, total) is expected


def test_bucket_padded_layout():
    # Two buckets of 6 and 5 elements padded to 8 each: Megatron's param offsets are padded.
    buffer = SimpleNamespace(
        numel=16,
        numel_unpadded=11,
        buckets=[
            SimpleNamespace(offset=0, numel_unpadded=6),
            SimpleNamespace(offset=8, numel_unpadded=5),
        ],
    )
    padded = _bucket_padded(torch.arange(1.0, 12.0), buffer)
    assert padded.tolist() == [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 0, 0, 0]
