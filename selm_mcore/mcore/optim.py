"""Megatron DDP, the distributed optimizer, the LR schedule, and the optimizer's saved state.

    ddp_models = wrap_ddp(models)                     # overlapped, bucketed DP comms on GPU
    optimizer = build_optimizer(ddp_models, cfg.optim, peak_lr=lr, params_dtype=dtype)
    scheduler = build_lr_scheduler(optimizer, cfg.optim, peak_lr=lr, total_steps=n)
    sync_params(ddp_models)                           # before reading the weights (saves)
    save_optimizer_state(optimizer, models, dir, sharding=DP_RESHARDABLE)
    load_optimizer_state(optimizer, models, dir, sharding=DP_RESHARDABLE)

Data-parallel communication (``wrap_ddp``): on GPU the gradient reduce-scatter overlaps the
backward pass (bucketed, dispatched per bucket on the last micro-batch) and the parameter
all-gather overlaps the next forward (per-module pre-hooks), with the hooks Megatron's own
training loop installs (``no_sync_func``, ``grad_sync_func``, and with interleaved pipelining
``param_sync_func``). The all-gather after an optimizer step is then deferred to the next
forward, so ``sync_params`` must run before the weights are read (checkpoints, export). On CPU
there is no overlap (one bucket, synchronous collectives after the last backward).

Optimizer state formats (``sharding``): ``dp_reshardable`` writes each rank's own shard with no
gather (Megatron's default; loads at the same tp/pp/vpp and gradient buckets, any dp);
``fully_reshardable`` gathers each replica's state on its DP rank 0's host (Megatron's
memory-efficient variant) in model coordinates and loads at any layout.

The Adam state is pre-filled only for torch's Adam/AdamW (Megatron's no-Apex path, always on
CPU), which needs three measures to save and load:

* the state filled in before the sharded state dict is built for loading (Megatron reads the
  step count from it);
* one ``step`` tensor per parameter after loading (Megatron installs one shared tensor, which
  torch's AdamW then increments once per parameter, skewing bias correction);
* the fully reshardable format to change TP/PP.

Transformer Engine's or Apex's FusedAdam keep the step in the param groups, and TE's
``state_dict()`` refuses state keys it does not know (``KeyError: 'step'``): Megatron allocates
their state itself (``uses_torch_adam`` picks the path).

Torch's AdamW implementation (``use_adam_implementation``): Megatron builds torch's AdamW without
choosing one, so torch would take its for-each kernels on CUDA and the one-tensor-at-a-time loop
on CPU. The distributed optimizer's AdamW runs ``fused=True`` on CUDA (one kernel over all of
this rank's fp32 shards; its ``step`` counters live on the device) and ``foreach=True``
elsewhere (on CPU bit-identical to the loop, measured). A checkpoint's param groups carry the
flags of the run that saved it; loading keeps this run's (``load_optimizer_state``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from selm_mcore.config.schema import OptimConfig
from selm_mcore.runtime.errors import UserError

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
OPTIMIZER_FORMATS = (DP_RESHARDABLE, FULLY_RESHARDABLE)
# The format of checkpoints that do not record one (written before formats were chosen).
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": FULLY_RESHARDABLE}


class OptimizerStateError(UserError, RuntimeError):
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


def build_optimizer(
    ddp_models: list, optim: OptimConfig, *, peak_lr: float, params_dtype: torch.dtype
):
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
        # Megatron asks for the DDP value here too.
        overlap_param_gather=ddp_models[0].ddp_config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(
        config, ddp_models, config_overrides=get_standard_config_overrides(config)
    )
    use_adam_implementation(optimizer)
    return optimizer


def use_adam_implementation(optimizer, *, fused: bool | None = None) -> None:
    """Torch AdamW's kernels for the distributed optimizer (module docstring): ``fused`` on
    CUDA, ``foreach`` elsewhere (``fused``: force one); the ``step`` counters follow (a fused
    group keeps them as fp32 on the parameter's device). A TE/Apex FusedAdam is left alone."""
    if not uses_torch_adam(optimizer):
        return
    for dist_opt in distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            params = group["params"]
            use_fused = bool(params) and all(p.is_cuda for p in params) if fused is None else fused
            _set_adam_kernels(inner, group, fused=use_fused, foreach=not use_fused)


def _set_adam_kernels(inner, group: dict, *, fused: bool | None, foreach: bool | None) -> None:
    """Set a torch AdamW param group's kernel flags; its ``step`` counters follow."""
    group["fused"], group["foreach"] = fused, foreach
    for param in group["params"]:
        state = inner.state.get(param)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = _step_tensor(state["step"], param, group)


def _step_tensor(step: torch.Tensor | float, param: torch.Tensor, group: dict) -> torch.Tensor:
    """A ``step`` counter where torch's AdamW wants it: fp32 on the parameter's device for fused
    (or capturable) groups, a CPU scalar otherwise."""
    device = param.device if group.get("fused") or group.get("capturable") else "cpu"
    if torch.is_tensor(step):
        return step.detach().to(device=device, dtype=torch.float32)
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def ddp_config_for(*, overlap: bool, num_chunks: int, bucket_size: int | None = None):
    """Megatron's DDP config: fp32 gradient reduce for the distributed optimizer; with
    ``overlap`` the reduce-scatter and the all-gather overlap compute, in buckets of
    ``bucket_size`` parameters (None: Megatron's max(40M, 1M * dp)); with interleaved
    pipelining the schedule dispatches each chunk's all-gather (``align_param_gather``)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap,
        align_param_gather=overlap and num_chunks > 1,
        bucket_size=bucket_size,
    )


def wrap_ddp(models: list, *, overlap: bool | None = None, bucket_size: int | None = None) -> list:
    """Megatron DDP around each chunk (gradient buffers for the distributed optimizer).

    ``overlap`` (None: when the model is on a GPU) overlaps the DP gradient reduce and parameter
    all-gather with compute and installs the schedule hooks (``install_sync_hooks``);
    ``bucket_size``: parameters per communication bucket (None: Megatron's default).
    """
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    if overlap is None:
        overlap = next(models[0].parameters()).is_cuda
    ddp_config = ddp_config_for(overlap=overlap, num_chunks=len(models), bucket_size=bucket_size)
    ddp_models = []
    for i, model in enumerate(models):
        ddp_models.append(
            DistributedDataParallel(
                model.config,
                ddp_config,
                model,
                # Chunks after the first skip bucketing (Megatron's own rule for interleaving).
                disable_bucketing=i > 0,
            )
        )
    # The schedule calls this after the last backward: DP grad reduce-scatter (or the wait for
    # the overlapped one), tied-embedding all-reduce across the pipeline.
    models[0].config.finalize_model_grads_func = finalize_model_grads
    install_sync_hooks(models[0].config, ddp_models)
    return ddp_models


def install_sync_hooks(config, ddp_models: list) -> None:
    """The hooks Megatron's training loop sets for the pipeline schedules.

    With overlap_grad_reduce: ``no_sync_func`` (no reduce before the last micro-batch) and
    ``grad_sync_func`` (start a chunk's reduce as soon as its last backward is done); with
    overlap_param_gather and align_param_gather: ``param_sync_func`` (the schedule starts each
    chunk's all-gather). Without overlap all three stay None (the synchronous path).
    """
    ddp_config = ddp_models[0].ddp_config

    def per_chunk(funcs: list):
        return funcs[0] if len(funcs) == 1 else funcs

    config.no_sync_func = config.grad_sync_func = config.param_sync_func = None
    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = per_chunk([m.no_sync for m in ddp_models])
        config.grad_sync_func = per_chunk([m.start_grad_sync for m in ddp_models])
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = per_chunk([m.start_param_sync for m in ddp_models])


def sync_params(ddp_models: list) -> None:
    """Finish the parameter all-gather that overlap_param_gather defers from the optimizer step
    to the next forward, so every rank holds the updated weights (call before saving or
    exporting them); nothing to do without overlap."""
    for model in ddp_models:
        if model.ddp_config.overlap_param_gather:
            model.start_param_sync(force_sync=True)


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
    return _all_finite(
        [
            buffer.grad_data
            for model in ddp_models
            for buffer in model.buffers + model.expert_parallel_buffers
        ],
        ctx,
    )


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


def uses_torch_adam(optimizer) -> bool:
    """True when the inner optimizers are torch's Adam/AdamW (Megatron's path without TE or
    Apex), False for a fused Adam (TE's or Apex's FusedAdam: step in the param groups)."""
    return all(
        isinstance(d.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        for d in distributed_optimizers(optimizer)
    )


def prefill_adam_state(optimizer) -> None:
    """Give every parameter without state torch AdamW's initial state (as its first step would).

    Only for torch Adam/AdamW; a fused Adam is left alone (Megatron allocates its state).
    """
    if not uses_torch_adam(optimizer):
        return
    for dist_opt in distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state.get(param):
                    inner.state[param] = {
                        "step": _step_tensor(0.0, param, group),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }


def zero_fused_adam_state(optimizer) -> None:
    """A fused Adam's initial state (zero exp_avg/exp_avg_sq, the step in the param group) for
    parameters that have none yet, so a save before any step still writes every tensor."""
    for dist_opt in distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state.get(param):
                    inner.state[param] = {
                        "exp_avg": torch.zeros_like(param),
                        "exp_avg_sq": torch.zeros_like(param),
                    }


def sharding_metadata(sharding: str) -> dict:
    """Megatron's ``sharded_state_dict`` metadata for an optimizer state format."""
    if sharding == FULLY_RESHARDABLE:
        # Gathered with gloo onto each replica's DP rank 0 only (not all-gathered on the GPU).
        return {
            "distrib_optim_sharding_type": sharding,
            "distrib_optim_fully_reshardable_mem_efficient": True,
        }
    if sharding == DP_RESHARDABLE:
        return {"distrib_optim_sharding_type": sharding}
    raise ValueError(f"optimizer state format {sharding!r} is not one of {OPTIMIZER_FORMATS}")


def _bucket_padded(world: torch.Tensor, buffer) -> torch.Tensor:
    """A buffer's gathered state in the buffer's own (bucket-padded) coordinates: each bucket's
    unpadded elements at the bucket's offset, zeros in the padding between buckets."""
    padded = world.new_zeros(buffer.numel)
    start = 0
    for bucket in buffer.buckets:
        padded[bucket.offset : bucket.offset + bucket.numel_unpadded] = world[
            start : start + bucket.numel_unpadded
        ]
        start += bucket.numel_unpadded
    return padded


@contextlib.contextmanager
def _fully_reshardable_coordinates(optimizer):
    """Make Megatron's fully_reshardable save slice each parameter at its true offset.

    megatron-core 0.16.1 gathers each buffer's state with the padding between its buckets
    removed (``get_parameter_state_dp_zero``) but slices parameters out of it at their offsets
    in the padded buffer (``param_index_map``), so with more than one bucket (overlapped DP
    communication; a tied embedding at pp > 1 gets a bucket of its own) every parameter after
    the first bucket is saved shifted, the last ones zero-padded. Inside this context the
    gathered state is laid out in the padded coordinates again (nothing changes with one
    bucket, or when Megatron already returns padded coordinates).
    """
    patched = []
    for dist_opt in distributed_optimizers(optimizer):
        gather = dist_opt.get_parameter_state_dp_zero

        def padded_gather(*args, _gather=gather, _opt=dist_opt, **kwargs):
            state = _gather(*args, **kwargs)
            if state is None:
                return None
            for gbuf_idx, buffer in enumerate(_opt.buffers):
                for world in state[gbuf_idx].values():
                    for key in ("param", "exp_avg", "exp_avg_sq"):
                        if world[key].numel() == buffer.numel_unpadded != buffer.numel:
                            world[key] = _bucket_padded(world[key], buffer)
            return state

        dist_opt.get_parameter_state_dp_zero = padded_gather
        patched.append(dist_opt)
    try:
        yield
    finally:
        for dist_opt in patched:
            del dist_opt.get_parameter_state_dp_zero  # back to the class's method


def _sharded_optimizer_state(
    optimizer, models: Sequence, sharding: str, *, is_loading: bool
) -> dict:
    """Megatron's sharded state dict of ``optimizer`` in format ``sharding``."""
    context = (
        _fully_reshardable_coordinates(optimizer)
        if sharding == FULLY_RESHARDABLE
        else contextlib.nullcontext()
    )
    with context:
        return optimizer.sharded_state_dict(
            model_sharded_state_dict(models),
            is_loading=is_loading,
            metadata=sharding_metadata(sharding),
        )


def save_optimizer_state(
    optimizer, models: Sequence, out_dir: str | Path, *, sharding: str = FULLY_RESHARDABLE
) -> None:
    """Save the distributed optimizer's state (every rank calls this; ``out_dir`` exists)."""
    from megatron.core import dist_checkpointing

    # A checkpoint before the first step still has a state.
    if uses_torch_adam(optimizer):
        prefill_adam_state(optimizer)
    else:
        zero_fused_adam_state(optimizer)
    sharded = _sharded_optimizer_state(optimizer, models, sharding, is_loading=False)
    dist_checkpointing.save({"optimizer": sharded}, str(out_dir))


def load_optimizer_state(
    optimizer, models: Sequence, in_dir: str | Path, *, sharding: str = FULLY_RESHARDABLE
) -> None:
    """Load a state written by ``save_optimizer_state`` in format ``sharding`` (any TP/PP/DP for
    fully_reshardable; the saving layout's tp/pp/vpp for dp_reshardable; see module doc).

    The dist checkpoint is read without unrestricted unpickling (``safe_load``). Torch AdamW
    keeps this run's kernels (fused / foreach), whatever the saving run used.
    """
    from selm_mcore.mcore.safe_load import load_dist_checkpoint

    torch_adam = uses_torch_adam(optimizer)
    kernels = [
        [(group.get("fused"), group.get("foreach")) for group in d.optimizer.param_groups]
        for d in distributed_optimizers(optimizer)
    ]
    if torch_adam:
        prefill_adam_state(optimizer)
    sharded = _sharded_optimizer_state(optimizer, models, sharding, is_loading=True)
    loaded = load_dist_checkpoint({"optimizer": sharded}, in_dir)["optimizer"]
    dist_optimizers = distributed_optimizers(optimizer)
    states = [loaded] if len(dist_optimizers) == 1 else [loaded[i] for i in sorted(loaded)]
    for dist_opt, state in zip(dist_optimizers, states):
        param_state = state.pop("param_state")
        found = state.pop("param_state_sharding_type")
        if found != sharding:
            raise OptimizerStateError(
                f"{in_dir}: optimizer state has sharding {found!r}, expected {sharding!r}"
            )
        # Param groups, step count and grad scaler first (torch Adam: one shared step tensor).
        dist_opt.load_state_dict(state)
        inner_state = dist_opt.optimizer.state
        # The exp_avg/exp_avg_sq/param copy walks each state's keys; "step" is not in the file.
        steps = {param: s.pop("step") for param, s in inner_state.items()} if torch_adam else {}
        with torch.no_grad():  # fp32 main params are views of the model's (leaf) params
            if sharding == DP_RESHARDABLE:
                dist_opt.load_parameter_state_from_dp_reshardable(param_state)
            else:
                dist_opt.load_parameter_state_from_fully_reshardable(param_state)
        for param, step in steps.items():
            inner_state[param]["step"] = step.detach().clone()
    if torch_adam:
        _restore_adam_kernels(optimizer, kernels)


def _restore_adam_kernels(optimizer, kernels: list) -> None:
    """Put back the fused / foreach flags a checkpoint's param groups replaced (and move the
    step counters where those kernels want them)."""
    for dist_opt, flags in zip(distributed_optimizers(optimizer), kernels):
        for group, (fused, foreach) in zip(dist_opt.optimizer.param_groups, flags):
            _set_adam_kernels(dist_opt.optimizer, group, fused=fused, foreach=foreach)


def optimizer_state_layout(ctx, ddp_config) -> dict:
    """What a dp_reshardable optimizer state depends on besides dp: the model-parallel layout
    and the gradient buckets (``ddp_config.bucket_size``; None = one bucket per chunk)."""
    return {"tp": ctx.tp, "pp": ctx.pp, "vpp": ctx.vpp, "grad_bucket_size": ddp_config.bucket_size}


def check_optimizer_state_layout(path, sharding: str, saved: dict, current: dict) -> None:
    """Refuse to load a dp_reshardable state at a layout it was not saved at (with the fix)."""
    if sharding != DP_RESHARDABLE:
        return
    changed = {
        key: (saved.get(key), current[key]) for key in current if saved.get(key) != current[key]
    }
    if changed:
        diff = ", ".join(
            f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changed.items()
        )
        raise OptimizerStateError(
            f"{path} holds the optimizer state in the dp_reshardable format (in-round "
            f"checkpoints), which loads only at the layout it was saved at ({diff}; dp may "
            f"change). Resume with parallel.tp={saved.get('tp')} parallel.pp={saved.get('pp')} "
            f"parallel.vpp={saved.get('vpp')} on the same kind of device, or resume from a "
            "fully reshardable checkpoint (the round's last one, or every one with "
            "train.reshardable_checkpoints=true)"
        )
