"""The trainer's learning-rate schedule equals transformers' warm-up schedules step by step.

The trainer drives Megatron's OptimizerParamScheduler (warm-up from 0, then cosine / linear /
constant, min_lr 0); the reference recipes use transformers' get_*_schedule_with_warmup with
warmup_steps = ceil(ratio * total). Compared over whole schedules, with and without warm-up.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from selm_mcore.config.schema import OptimConfig
from selm_mcore.mcore.optim import build_lr_scheduler, warmup_steps

HF_SCHEDULES = {
    "cosine": get_cosine_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
    "constant": lambda opt, warmup, total: get_constant_schedule_with_warmup(opt, warmup),
}


def hf_learning_rates(schedule: str, peak_lr: float, warmup: int, total: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=peak_lr)
    scheduler = HF_SCHEDULES[schedule](optimizer, warmup, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def our_learning_rates(
    schedule: str, peak_lr: float, warmup_ratio: float, total: int
) -> list[float]:
    optimizer = SimpleNamespace(param_groups=[{}, {"wd_mult": 0.0}])
    optim = OptimConfig(lr=peak_lr, warmup_ratio=warmup_ratio, schedule=schedule, weight_decay=0.1)
    scheduler = build_lr_scheduler(optimizer, optim, peak_lr=peak_lr, total_steps=total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        # Both param groups follow the schedule; weight decay stays constant (0 for wd_mult 0).
        assert optimizer.param_groups[1]["lr"] == rates[-1]
        assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1)
        assert optimizer.param_groups[1]["weight_decay"] == 0.0
        scheduler.step(1)
    return rates


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup_ratio,total", [(0.0, 12), (0.1, 30), (0.25, 9), (0.1, 1)])
def test_schedule_matches_transformers(schedule, warmup_ratio, total):
    peak = 5e-7
    warmup = warmup_steps(total, warmup_ratio)
    ours = our_learning_rates(schedule, peak, warmup_ratio, total)
    theirs = hf_learning_rates(schedule, peak, warmup, total)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def test_warmup_steps_round_up_like_transformers_and_leave_a_decay_step():
    assert warmup_steps(478, 0.1) == 48  # ceil(47.8): SELM's 61,135 / 3 rows at batch 128
    assert warmup_steps(30, 0.1) == 3
    assert warmup_steps(10, 0.0) == 0
    assert warmup_steps(1, 0.1) == 0  # Megatron needs warmup < total


def test_cosine_reaches_min_lr_at_the_end():
    optimizer = SimpleNamespace(param_groups=[{}])
    optim = OptimConfig(lr=1e-6, min_lr=1e-7, warmup_ratio=0.1, schedule="cosine")
    scheduler = build_lr_scheduler(optimizer, optim, peak_lr=1e-6, total_steps=20)
    scheduler.step(20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-7)
