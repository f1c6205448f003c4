"""One round of SELM training on Megatron-Core: ``selm train CONFIG [--set a.b=v ...]``.

    selm refpass CONFIG --set train.output_dir=OUT          # reference log-probs, once
    selm train   CONFIG --set train.output_dir=OUT          # then train (resumes if interrupted)
    torchrun --nproc-per-node 4 -m selm_mcore.cli train CONFIG --set parallel.tp=2 parallel.pp=2

``train_round`` reads top to bottom: ``load_round_data`` (data and reference log-probs, before
any process group exists, so a stale cache or bad data fails first), ``build_training`` (the
policy from ``train.init_from`` or ``model.hf_dir``, a Megatron checkpoint folder or an HF
folder, which is also the frozen reference; Megatron DDP + the distributed optimizer (AdamW);
warm-up + cosine / linear / constant schedule; the resumed step), then ``train_step`` until the
round's steps are done, with step checkpoints and the final model.

Each optimizer step takes ``train.global_batch_size`` examples (``DistributedBatchSampler``, a
slice per DP rank), splits them into micro-batches of ``train.micro_batch_size`` examples, each
one [S*B, T] forward of its chosen, rejected and y_ref sequences, and runs Megatron's
``get_forward_backward_func`` (1F1B; interleaved with ``parallel.vpp``) through
``selm_mcore.mcore.forward``. The loss (SELM / DPO / IPO, ``selm_mcore.train.loss``) is computed on
the
last pipeline stage from the fused vocab-parallel log-probs and the reference log-probs:
precomputed by ``selm refpass`` (``train.reference_mode=precomputed``; the cache key is checked)
or computed on the fly by a frozen copy (``onthefly``).

Loss scaling: each micro-batch returns the mean loss of its B examples; the schedule divides it
by the number of micro-batches and DDP averages gradients over DP, so the gradient is that of
the mean over the global batch. Logged values are exact global means (per-example sums and
counts reduced over micro-batches, DP and the pipeline), never the schedule's divided tensor.
The step line also shows MFU (``selm_mcore.train.metrics``: policy model FLOP/s per device over the
device peak).

Outputs in ``train.output_dir``:
    final/                 the trained policy: a Megatron checkpoint folder (docs/architecture.md)
    checkpoints/step_*/    with train.save_interval > 0: every N steps and at the end, with the
                           optimizer, scheduler, data position and RNG (selm_mcore.mcore.checkpoint;
                           the optimizer state dp-reshardable in the round, fully reshardable at
                           the end or with train.reshardable_checkpoints)
    metrics.jsonl          one record per step (rank 0); tensorboard/ with train.tensorboard
    ref_logps.safetensors  the reference cache, when train.ref_cache is not set

Non-finite values: after the backward of each step the loss (reduced over the data-parallel
ranks and the pipeline) and every rank's gradients are checked before the optimizer reads
them; a NaN or infinity stops the run with ``NonFiniteError`` naming the step, before the
update is applied and before anything is saved. The step checkpoints on disk stay as they
were (``latest`` names the last good one), no final model is written, and metrics.jsonl holds
the bad step's values. The parameters are checked again before every save.

Resume: a step checkpoint stores what defines the run (``selm_mcore.train.guards.run_identity``: the
start model's fingerprint, the data hash, the loss and optimizer settings, the number of steps;
nothing that depends on tp/pp/dp/vpp or the packing layout); a resume whose run differs is
refused with ``ResumeError`` naming each differing key before any model is loaded.

Fault hooks (tests): with ``SELM_TRAIN_KILL_AFTER_STEP=k`` every rank SIGKILLs itself right after
step k (and its checkpoint, if one is due), as a crash would; ``SELM_TRAIN_NAN_AT_STEP=k``
makes the loss of step k NaN (``selm_mcore.train.guards``).

Shape legend: B examples per micro-batch, S = 2 or 3 sequences per example, N = S * B, T tokens.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selm_mcore.config.io import add_config_arguments, config_from_args
from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.batches import DistributedBatchSampler, micro_batches
from selm_mcore.data.packing import pack_budget
from selm_mcore.data.tokenize import (
    PreferenceDataset,
    load_preferences,
    load_tokenizer,
    pad_token_id,
)
from selm_mcore.mcore.checkpoint import DTYPES, hf_files_dir
from selm_mcore.mcore.forward import (
    MicroBatch,
    collate_micro_batches,
    forward_only_logps,
    length_multiple,
    pack_micro_batches,
    run_micro_batches,
    sequence_logps,
    token_multiple,
)
from selm_mcore.mcore.model import sequence_length_multiple
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.preflight import check_output_dir, model_bytes, step_checkpoint_bytes
from selm_mcore.train.guards import (
    NonFiniteError,
    check_resume,
    loss_fn_for_step,
    raise_non_finite,
    run_identity,
)
from selm_mcore.train.metrics import (
    ModelShape,
    StepMetricsWriter,
    device_peak,
    forward_flops,
    packed_forward_flops,
    peak_memory_gib,
)
from selm_mcore.train.refpass import (
    ReferenceLogps,
    load_reference_cache,
    reference_fingerprint,
    reference_key,
)

logger = logging.getLogger(__name__)

KILL_AFTER_STEP_ENV = "SELM_TRAIN_KILL_AFTER_STEP"
# Per-example metric sums reduced each step, in a fixed order (every rank builds the same vector).
SUMMED_METRICS = (
    "loss",
    "loss/preference",
    "loss/optimism",
    "loss/sft",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
    "logps/pi_response",
    "logps/ref_response",
)
COUNTS = ("num_examples", "num_tokens", "num_computed", "num_response_tokens", "model_flops")


# --- the loss of one micro-batch and the step's metrics ----------------------------------------


def selm_step_loss(
    micro_batch: MicroBatch,
    logits: torch.Tensor,
    *,
    cfg: SelmConfig,
    tp_group,
    vocab_size: int,
    shape: ModelShape,
):
    """Loss of one micro-batch on the last stage: (mean loss, per-example sums for logging)."""
    from selm_mcore.train.loss import selm_loss

    batch = micro_batch.batch
    policy_chosen, policy_rejected, policy_yref = batch.split(
        sequence_logps(logits, batch, tp_group=tp_group, vocab_size=vocab_size)
    )
    ref_chosen, ref_rejected, ref_yref = batch.split(micro_batch.ref_logps.to(logits.device))
    response_lengths = batch.response_lengths().to(logits.device)
    chosen_tokens, rejected_tokens, _ = batch.split(response_lengths)
    loss, metrics = selm_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        policy_yref,
        ref_yref,
        beta=cfg.loss.beta,
        alpha=cfg.loss.alpha,
        loss_type=cfg.loss.loss_type,
        sft_weight=cfg.loss.sft_weight,
        chosen_num_tokens=chosen_tokens,
        rejected_num_tokens=rejected_tokens,
    )
    # Policy forward + backward = 3 forwards of the layout actually computed.
    if micro_batch.packed:
        flops = 3.0 * packed_forward_flops(shape, batch.segments.tolist(), batch.head_index.numel())
    else:
        flops = 3.0 * forward_flops(shape, micro_batch.sequence_lengths)
    counts = torch.tensor(
        [batch.num_examples, micro_batch.num_tokens, micro_batch.num_computed, flops],
        dtype=torch.float64,
        device=logits.device,
    )
    sums = {
        "loss": loss.detach().sum(),
        "num_examples": counts[0],
        "num_tokens": counts[1],
        "num_computed": counts[2],
        "model_flops": counts[3],
        "num_response_tokens": response_lengths.sum().double(),
    }
    sums.update({name: value.sum() for name, value in metrics.items()})
    if micro_batch.loss_scale is not None:
        # Megatron divides by the micro-batch count: scaled so the gradient is the global mean.
        return loss.sum() * micro_batch.loss_scale, sums
    return loss.mean(), sums


def reduce_step_metrics(reduced: list[dict[str, torch.Tensor]], ctx) -> dict[str, float]:
    """Global means of the per-example sums (every rank calls this; all get the result).

    The last stage sums its micro-batches; a sum over DP and then over the pipeline (other
    stages contribute zeros) gives every rank the totals. Metrics this run does not produce
    (e.g. no y_ref) are left out; produced ones are kept even when NaN or infinite.
    """
    names = SUMMED_METRICS + COUNTS
    # [sums of every name, then 1 per name the micro-batches produce]
    totals = torch.zeros(2 * len(names), dtype=torch.float64, device=ctx.device)
    if ctx.is_last_stage and reduced:
        zero = torch.zeros((), dtype=torch.float64, device=ctx.device)
        sums = torch.stack(
            [
                torch.stack([r[name].detach().double() if name in r else zero for name in names])
                for r in reduced
            ]
        ).sum(0)
        produced = torch.tensor(
            [float(name in reduced[0]) for name in names], dtype=torch.float64, device=ctx.device
        )
        totals = torch.cat([sums, produced])
    if ctx.dp > 1:
        dist.all_reduce(totals, group=ctx.dp_group)
    if ctx.pp > 1:
        dist.all_reduce(totals, group=ctx.pp_group)
    sums = dict(zip(names, totals[: len(names)].tolist()))
    produced = dict(zip(names, totals[len(names) :].tolist()))
    count = sums["num_examples"]
    out = {name: sums[name] / count for name in SUMMED_METRICS if produced[name] > 0}
    out.update({name: sums[name] for name in COUNTS})
    return out


def _maybe_kill_after(step: int) -> None:
    value = os.environ.get(KILL_AFTER_STEP_ENV)
    if value and int(value) == step:
        logger.warning("%s=%s: killing this rank after step %d", KILL_AFTER_STEP_ENV, value, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


# --- building a round -------------------------------------------------------------------------


def total_train_steps(cfg: SelmConfig, num_examples: int) -> int:
    """Optimizer steps of the round: train.max_steps if set, else epochs * full batches."""
    steps_per_epoch = num_examples // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise InputError(
            f"{num_examples} examples in data.train_path are fewer than "
            f"train.global_batch_size={cfg.train.global_batch_size}"
        )
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch


@dataclass
class RoundData:
    """What a round trains on, loaded before any process group exists."""

    source: Path  # the starting policy and frozen reference
    tokenizer: Any
    dataset: PreferenceDataset
    reference_cache: ReferenceLogps | None  # None: computed on the fly
    total_steps: int
    pack_tokens: int  # tokens per packed micro-batch (0: packing none)
    source_fingerprint: str = ""  # reference_fingerprint(source): the start model

    @property
    def packed(self) -> bool:
        return self.pack_tokens > 0


def load_round_data(cfg: SelmConfig) -> RoundData:
    """The round's data and (precomputed) reference log-probs; a bad row or a stale cache fails
    here, before a model is built."""
    source = cfg.start_model()
    tokenizer = load_tokenizer(cfg.model, hf_files_dir(source))
    dataset = load_preferences(cfg.data, tokenizer)
    if cfg.loss.alpha > 0 and not dataset.has_yref:
        raise InputError(
            f"loss.alpha={cfg.loss.alpha} needs y_ref: the rows of {cfg.data.train_path} have no "
            "reference_response; generate it (selm generate) or set loss.alpha=0 (iterative DPO)"
        )
    reference_cache, fingerprint = None, ""
    if cfg.train.reference_mode == "precomputed":
        key = reference_key(
            dataset,
            source,
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        )
        reference_cache = load_reference_cache(cfg.train.ref_cache_path(), key)
        fingerprint = key.reference
    return RoundData(
        source=source,
        tokenizer=tokenizer,
        dataset=dataset,
        reference_cache=reference_cache,
        total_steps=total_train_steps(cfg, len(dataset)),
        pack_tokens=pack_budget(
            cfg.data, dataset.examples, multiple=sequence_length_multiple(cfg.parallel.tp)
        ),
        source_fingerprint=fingerprint or reference_fingerprint(source),
    )


@dataclass
class Training:
    """Everything the steps of a round use, built once by ``build_training``."""

    cfg: SelmConfig
    ctx: Any
    data: RoundData
    models: list  # the unwrapped GPTModel chunks (checkpoints, export)
    ddp_models: list
    ref_models: list | None  # the frozen reference (reference_mode=onthefly)
    optimizer: Any
    scheduler: Any
    sampler: DistributedBatchSampler
    loss_fn: Any
    pad_id: int
    step: int  # optimizer steps done (resumed from a checkpoint or 0)
    resumed_from: Path | None
    checkpoint_kwargs: dict[str, Any]
    device_peak_flops: float

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step of packing none (packed steps have as many as the rows)."""
        return self.cfg.train.global_batch_size // (self.ctx.dp * self.cfg.train.micro_batch_size)


def build_training(
    cfg: SelmConfig, ctx, data: RoundData, *, policy: tuple[list, Any] | None = None
) -> Training:
    """Policy (resumed from ``<output_dir>/checkpoints/latest`` when there is one), reference,
    DDP, optimizer, schedule and sampler of a round. ``policy``: (model chunks, HF config)
    built by the caller instead of loaded (the benchmarks' shape-only random models)."""
    from selm_mcore.mcore.checkpoint import (
        find_latest,
        load_frozen_policy,
        load_policy,
        load_training_state,
        read_train_state,
    )
    from selm_mcore.mcore.optim import build_lr_scheduler, build_optimizer, wrap_ddp

    cfg.validate(world_size=ctx.world_size)
    checkpoints = Path(cfg.train.output_dir) / "checkpoints"
    resume_from = find_latest(checkpoints) if cfg.train.resume else None
    identity = run_identity(
        cfg,
        start_model=data.source_fingerprint,
        data_hash=data.dataset.content_hash(),
        steps=data.total_steps,
    )
    if resume_from is not None:  # refused before any model is loaded
        check_resume(resume_from, read_train_state(resume_from).extra.get("run"), identity)
    ref_models = None
    if cfg.train.reference_mode == "onthefly":
        ref_models = load_frozen_policy(data.source, ctx, cfg.model, packed=data.packed)
    if policy is not None:
        models, hf_config = policy
    else:
        models, hf_config = load_policy(
            resume_from or data.source,
            ctx,
            cfg.model,
            recompute=cfg.model.recompute,
            packed=data.packed,
        )
    data.dataset.check_token_ids(models[0].true_vocab_size)
    if data.pack_tokens % token_multiple(models):
        raise RuntimeError(
            f"packed rows of {data.pack_tokens} tokens do not split over "
            f"{token_multiple(models)} sequence-parallel ranks"
        )
    ddp_models = wrap_ddp(models)
    peak_lr = cfg.optim.lr_for_round(cfg.train.round_index)
    optimizer = build_optimizer(
        ddp_models, cfg.optim, peak_lr=peak_lr, params_dtype=DTYPES[cfg.model.dtype]
    )
    scheduler = build_lr_scheduler(
        optimizer, cfg.optim, peak_lr=peak_lr, total_steps=data.total_steps
    )
    sampler = DistributedBatchSampler(
        len(data.dataset),
        cfg.train.global_batch_size,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp,
        shuffle=cfg.data.shuffle,
        seed=cfg.train.seed,
    )
    step = 0
    if resume_from is not None:
        state = load_training_state(
            resume_from, models=models, optimizer=optimizer, scheduler=scheduler, ctx=ctx
        )
        step = state.step
        sampler.load_state_dict(state.data)

    loss_fn = functools.partial(
        selm_step_loss,
        cfg=cfg,
        tp_group=ctx.tp_group if ctx.tp > 1 else None,
        vocab_size=models[0].true_vocab_size,
        shape=ModelShape.from_hf_config(hf_config),
    )
    checkpoint_kwargs = dict(
        models=models,
        optimizer=optimizer,
        scheduler=scheduler,
        ctx=ctx,
        hf_config=hf_config,
        tokenizer_dir=hf_files_dir(data.source),
        keep=cfg.train.keep_checkpoints,
        extra={"run": identity},
    )
    peak = device_peak(ctx.device.type, torch.get_num_threads(), seconds=0.25)
    return Training(
        cfg=cfg,
        ctx=ctx,
        data=data,
        models=models,
        ddp_models=ddp_models,
        ref_models=ref_models,
        optimizer=optimizer,
        scheduler=scheduler,
        sampler=sampler,
        loss_fn=loss_fn,
        pad_id=pad_token_id(data.tokenizer),
        step=step,
        resumed_from=resume_from,
        checkpoint_kwargs=checkpoint_kwargs,
        device_peak_flops=peak["flops"],
    )


# --- one step ---------------------------------------------------------------------------------


def step_micro_batches(run: Training, indices: list[int]) -> list[MicroBatch]:
    """This DP rank's micro-batches of one step: packed rows or padded [S*B, T] batches."""
    cfg, ctx = run.cfg, run.ctx
    # Sequence parallelism needs T to be a multiple of tp (a no-op without it).
    pad_to_multiple_of = length_multiple(cfg.data.pad_to_multiple_of, run.models)
    if run.data.packed:
        return pack_micro_batches(
            run.data.dataset,
            indices,
            budget=run.data.pack_tokens,
            shared_prompt=cfg.data.packing == "shared_prompt",
            pad_id=run.pad_id,
            pad_to_multiple_of=pad_to_multiple_of,
            fixed_length=ctx.pp > 1,
            num_microbatches_multiple=ctx.pp if ctx.vpp else 1,
            examples_per_step=len(indices),
            device=ctx.device,
        )
    return collate_micro_batches(
        run.data.dataset,
        micro_batches(indices, cfg.train.micro_batch_size),
        pad_id=run.pad_id,
        pad_to_multiple_of=pad_to_multiple_of,
        seq_length=cfg.data.seq_length(),
        device=ctx.device,
    )


def train_step(run: Training, indices: list[int]) -> dict[str, float]:
    """One optimizer step on this DP rank's examples ``indices``; returns the step's metrics."""
    cfg, ctx = run.cfg, run.ctx
    start = time.perf_counter()
    batches = step_micro_batches(run, indices)
    if run.ref_models is not None:
        ref_logps = forward_only_logps(run.ref_models, ctx, batches, run.models[0].true_vocab_size)
        for micro_batch, logps in zip(batches, ref_logps or []):
            micro_batch.ref_logps = logps
    else:
        for micro_batch in batches:
            micro_batch.ref_logps = run.data.reference_cache.for_batch(micro_batch.batch)

    for model in run.ddp_models:
        model.zero_grad_buffer()
    run.optimizer.zero_grad()
    step = run.step + 1
    reduced = run_micro_batches(
        run.ddp_models, batches, loss_fn_for_step(run.loss_fn, step), forward_only=False
    )
    metrics = reduce_step_metrics(reduced, ctx)
    lr = run.optimizer.param_groups[0]["lr"]
    _check_before_update(run, step, metrics)
    update_ok, grad_norm, _ = run.optimizer.step()
    if not update_ok:
        logger.warning("step %d: optimizer step skipped (non-finite gradients)", step)
    elif grad_norm is not None and not math.isfinite(grad_norm):
        raise_non_finite(
            cfg.train.output_dir,
            step,
            f"the gradient norm is {grad_norm}",
            {**metrics, "grad_norm": grad_norm, "lr": lr},
            lr=lr,
            applied=True,
        )
    run.scheduler.step(1)
    run.step = step
    elapsed = time.perf_counter() - start
    flops_per_device = metrics.pop("model_flops") / ctx.world_size
    metrics.update(
        grad_norm=grad_norm,
        lr=lr,
        step_time_s=elapsed,
        tokens_per_s=metrics["num_tokens"] / elapsed,
        pairs_per_s=metrics["num_examples"] / elapsed,
        packing_efficiency=metrics["num_tokens"] / max(metrics["num_computed"], 1),
        tflops=flops_per_device / elapsed / 1e12,
        mfu=flops_per_device / elapsed / run.device_peak_flops,
        memory_gib=peak_memory_gib(ctx.device),
    )
    return metrics


def _check_before_update(run: Training, step: int, metrics: dict[str, float]) -> None:
    """Stop before the optimizer reads gradients when the loss or any gradient is not finite."""
    from selm_mcore.mcore.optim import grads_are_finite

    loss = metrics.get("loss", float("nan"))
    grads_ok = grads_are_finite(run.ddp_models, run.ctx)
    if math.isfinite(loss) and grads_ok:
        return
    what = (f"the loss is {loss}" if not math.isfinite(loss) else "the loss is finite") + (
        " and the gradients are finite" if grads_ok else ", a gradient holds NaN or infinity"
    )
    lr = run.optimizer.param_groups[0]["lr"]
    logged = {k: v for k, v in metrics.items() if k != "model_flops"}
    raise_non_finite(
        run.cfg.train.output_dir,
        step,
        what,
        {**logged, "grad_norm": float("nan"), "lr": lr},
        lr=lr,
        applied=False,
    )


def _check_parameters(run: Training) -> None:
    """Refuse to save a model with a non-finite parameter (every rank calls this)."""
    from selm_mcore.mcore.optim import params_are_finite

    if not params_are_finite(run.models, run.ctx):
        raise_non_finite(
            run.cfg.train.output_dir,
            run.step,
            "a parameter is NaN or infinite before a save",
            {},
            lr=run.optimizer.param_groups[0]["lr"],
            applied=True,
        )


# --- the round --------------------------------------------------------------------------------


def step_checkpoint_reshardable(cfg: SelmConfig, step: int, total_steps: int) -> bool:
    """Whether checkpoint ``step`` stores the optimizer state fully reshardable: the round's
    last one (or every one with train.reshardable_checkpoints); in-round ones are
    dp_reshardable (no gather; the same tp/pp/vpp resumes them)."""
    return step == total_steps or cfg.train.reshardable_checkpoints


def save_step_checkpoint(run: Training, root: Path) -> None:
    """Step checkpoint ``run.step`` under ``root`` (every rank calls this)."""
    from selm_mcore.mcore.checkpoint import save_checkpoint
    from selm_mcore.mcore.optim import sync_params

    sync_params(run.ddp_models)  # the weights of this step (overlapped all-gather)
    _check_parameters(run)
    save_checkpoint(
        root,
        run.step,
        data_state=run.sampler.state_dict(),
        reshardable=step_checkpoint_reshardable(run.cfg, run.step, run.data.total_steps),
        **run.checkpoint_kwargs,
    )


def check_train_outputs(cfg: SelmConfig) -> None:
    """train.output_dir is writable and has room for the final model and (with
    train.save_interval) one step checkpoint, before anything is loaded."""
    config_dir = hf_files_dir(cfg.start_model())
    needed = model_bytes(config_dir, cfg.model.dtype)
    if cfg.train.save_interval:
        needed += step_checkpoint_bytes(config_dir, cfg.model.dtype)
    check_output_dir(cfg.train.output_dir, needed_bytes=needed, what="train.output_dir")


def train_round(cfg: SelmConfig) -> Path:
    """Train one round; returns the folder of the final model (``<output_dir>/final``)."""
    from selm_mcore.mcore.checkpoint import save_model_atomic
    from selm_mcore.mcore.optim import sync_params
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.runtime.deps import check_dependencies

    check_dependencies(cfg, phases=("train", "data"))
    check_train_outputs(cfg)
    data = load_round_data(cfg)
    ctx = init_parallel(
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, seed=cfg.parallel.seed
    )
    try:
        run = build_training(cfg, ctx, data)
        total_steps = data.total_steps
        output_dir = Path(cfg.train.output_dir)
        writer = StepMetricsWriter(
            output_dir,
            total_steps=total_steps,
            enabled=ctx.rank == 0,
            tensorboard=cfg.train.tensorboard,
            resume_step=run.step,
            log_interval=cfg.train.log_interval,
        )
        layout = (
            f"packing {cfg.data.packing} in micro-batches of {data.pack_tokens} tokens"
            if data.packed
            else f"{run.num_microbatches} micro-batches x {cfg.train.micro_batch_size} pairs"
        )
        logger.info(
            "training %d steps (from step %d): %d examples, global batch %d over dp %d, "
            "%s, peak lr %.3g, reference %s",
            total_steps,
            run.step,
            len(data.dataset),
            cfg.train.global_batch_size,
            ctx.dp,
            layout,
            cfg.optim.lr_for_round(cfg.train.round_index),
            cfg.train.reference_mode,
        )
        checkpoints = output_dir / "checkpoints"
        last_saved = run.step if run.resumed_from is not None else -1
        batches: Iterator[list[int]] = run.sampler.batches()
        while run.step < total_steps:
            try:
                metrics = train_step(run, next(batches))
            except NonFiniteError as exc:
                writer.log(exc.step, exc.metrics)
                writer.close()
                raise
            writer.log(run.step, metrics)
            if cfg.train.save_interval and (
                run.step % cfg.train.save_interval == 0 or run.step == total_steps
            ):
                save_step_checkpoint(run, checkpoints)
                last_saved = run.step
            _maybe_kill_after(run.step)
        writer.close()
        if not cfg.train.save_interval:
            sync_params(run.ddp_models)  # a step checkpoint would have done both
            _check_parameters(run)
        elif last_saved != run.step:
            save_step_checkpoint(run, checkpoints)
        final = save_model_atomic(
            run.models,
            ctx,
            output_dir / "final",
            hf_config=run.checkpoint_kwargs["hf_config"],
            tokenizer_dir=hf_files_dir(data.source),
        )
        logger.info("round done: %d steps, final model %s", run.step, final)
        return final
    finally:
        destroy_parallel()


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def main(args) -> int:
    train_round(config_from_args(args))
    return 0
