"""Megatron DDP, the distributed optimizer, the LR schedule, and the optimizer's saved state.

    ddp_models = wrap_ddp(models)
    optimizer = build_optimizer(ddp_models, cfg.optim, peak_lr=lr, params_dtype=dtype)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, peak_lr=lr, total_steps=n)
    save_optimizer_state(optimizer, models, dir) / load_optimizer_state(optimizer, models, dir)

The distributed optimizer on the no-Apex path (torch AdamW; always on CPU) needs three
measures to save and load at another TP/PP/DP, taken by ``load_optimizer_state``:

* ``fully_reshardable`` sharding (the default format cannot change TP/PP);
* Adam state filled in before the sharded state dict is built for loading (Megatron reads the
  step count from it);
* one ``step`` tensor per parameter after loading (Megatron installs one shared tensor, which
  torch's AdamW then increments once per parameter, skewing bias correction).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from selm_mcore.config import OptimConfig

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class OptimizerStateError(RuntimeError):
    """An optimizer state that cannot be loaded into this run's optimizer."""


# --- building ---------------------------------------------------------------------------------


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """ceil(ratio * total) as transformers computes it, below total (Megatron needs one decay
    step)."""
    return min(math.ceil(total_steps * warmup_ratio), max(total_steps - 1, 0))


def build_lr_scheduler(optimizer, optim: OptimConfig, *, peak_lr: float, total_steps: int):
    """Megatron's OptimizerParamScheduler: linear warm-up from 0, then cosine/linear/constant.

    Equals transformers' get_{cosine,linear,constant}_schedule_with_warmup when min_lr = 0: the
    learning rate of step k (0-based) is the schedule at k; ``scheduler.step(1)`` after each
    optimizer step advances it.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total_steps = max(total_steps, 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=peak_lr,
        min_lr=min(optim.min_lr, peak_lr),
        lr_warmup_steps=warmup_steps(total_steps, optim.warmup_ratio),
        lr_decay_steps=total_steps,
        lr_decay_style=optim.schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
    )


def build_optimizer(ddp_models: list, optim: OptimConfig, *, peak_lr: float,
                    params_dtype: torch.dtype):
    """Megatron's distributed optimizer (AdamW; no weight decay on 1-D params and biases)."""
    from megatron.core.optimizer import (
        OptimizerConfig,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )

    config = OptimizerConfig(
        optimizer="adam",
        lr=peak_lr,
        min_lr=min(optim.min_lr, peak_lr),
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=True,
    )
    return get_megatron_optimizer(config, ddp_models,
                                  config_overrides=get_standard_config_overrides(config))


def wrap_ddp(models: list) -> list:
    """Megatron DDP around each chunk (gradient buffers for the distributed optimizer)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True)
    ddp_models = []
    for i, model in enumerate(models):
        ddp_models.append(DistributedDataParallel(
            model.config, ddp_config, model,
            # Chunks after the first skip bucketing (Megatron's own rule for interleaving).
            disable_bucketing=i > 0))
    # The schedule calls this after the last backward: DP grad reduce-scatter, tied-embedding
    # all-reduce across the pipeline.
    models[0].config.finalize_model_grads_func = finalize_model_grads
    return ddp_models


# --- finiteness checks ------------------------------------------------------------------------


def _all_finite(tensors, ctx) -> bool:
    """True when every element of ``tensors`` on every rank is finite (one world all-reduce).

    A float64 sum of all elements is NaN or infinite exactly when an element is (a float64 sum
    of finite fp32/bf16 values cannot overflow), and needs no tensor-sized temporary.
    """
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for tensor in tensors:
        total += tensor.detach().sum(dtype=torch.float64)
    bad = (~torch.isfinite(total)).to(torch.float32)
    if ctx.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def grads_are_finite(ddp_models: list, ctx) -> bool:
    """Every gradient of every rank finite: checks the DDP gradient buffers after the backward
    and the gradient reduction, before the optimizer reads them (every rank calls this)."""
    return _all_finite([buffer.grad_data for model in ddp_models
                        for buffer in model.buffers + model.expert_parallel_buffers], ctx)


def params_are_finite(models: Sequence, ctx) -> bool:
    """Every parameter of every rank finite (every rank calls this)."""
    return _all_finite([param for model in models for param in model.parameters()], ctx)


# --- the optimizer state in a checkpoint ------------------------------------------------------


def model_sharded_state_dict(models: Sequence) -> dict:
    """The model's sharded state dict (unwrapped chunks): the optimizer state is keyed by it."""
    return {f"chunk{i}": model.sharded_state_dict(prefix="") for i, model in enumerate(models)}


def distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizer(s) of ``optimizer`` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prefill_adam_state(optimizer) -> None:
    """Give every parameter torch AdamW's initial state (as its first step would)."""
    for dist_opt in distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state.get(param):
                    inner.state[param] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param,
                                                       memory_format=torch.preserve_format),
                    }


def save_optimizer_state(optimizer, models: Sequence, out_dir: str | Path) -> None:
    """Save the distributed optimizer's state (every rank calls this; ``out_dir`` exists)."""
    from megatron.core import dist_checkpointing

    prefill_adam_state(optimizer)  # a checkpoint before the first step still has a state
    sharded = optimizer.sharded_state_dict(model_sharded_state_dict(models),
                                           metadata=OPTIMIZER_SHARDING)
    dist_checkpointing.save({"optimizer": sharded}, str(out_dir))


def load_optimizer_state(optimizer, models: Sequence, in_dir: str | Path) -> None:
    """Load a state written by ``save_optimizer_state`` at any TP/PP/DP (see module doc).

    The dist checkpoint is read without unrestricted unpickling (``safe_load``).
    """
    from selm_mcore.mcore.safe_load import load_dist_checkpoint

    prefill_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(model_sharded_state_dict(models), is_loading=True,
                                           metadata=OPTIMIZER_SHARDING)
    loaded = load_dist_checkpoint({"optimizer": sharded}, in_dir)["optimizer"]
    dist_optimizers = distributed_optimizers(optimizer)
    states = [loaded] if len(dist_optimizers) == 1 else [loaded[i] for i in sorted(loaded)]
    for dist_opt, state in zip(dist_optimizers, states):
        param_state = state.pop("param_state")
        sharding = state.pop("param_state_sharding_type")
        if sharding != OPTIMIZER_SHARDING["distrib_optim_sharding_type"]:
            raise OptimizerStateError(
                f"{in_dir}: optimizer state has sharding {sharding!r}, expected "
                f"{OPTIMIZER_SHARDING['distrib_optim_sharding_type']!r}")
        # Param groups, step count and grad scaler first (this installs one shared step tensor).
        dist_opt.load_state_dict(state)
        inner_state = dist_opt.optimizer.state
        # The exp_avg/exp_avg_sq/param copy walks each state's keys; "step" is not in the file.
        steps = {param: s.pop("step") for param, s in inner_state.items()}
        dist_opt.load_parameter_state_from_fully_reshardable(param_state)
        for param, s in inner_state.items():
            s["step"] = steps[param].detach().clone()
