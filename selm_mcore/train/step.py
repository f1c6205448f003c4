"""One optimizer step of SELM training: ``train_step(run, indices)``.

A step takes this DP rank's slice of ``train.global_batch_size`` examples and makes its
micro-batches: packed rows (``data.packing``) or [S*B, T] forwards of ``train.micro_batch_size``
examples' chosen, rejected and y_ref sequences. Megatron's ``get_forward_backward_func`` (1F1B;
interleaved with ``parallel.vpp``) runs them through ``selm_mcore.mcore.forward``; on the last
pipeline stage ``selm_step_loss`` computes the loss (SELM / DPO / IPO, ``selm_mcore.train.loss``)
from the fused vocab-parallel log-probs and the reference log-probs (precomputed, or from the
frozen copy with ``train.reference_mode=onthefly``).

Loss scaling: each micro-batch returns the mean loss of its B examples; the schedule divides it
by the number of micro-batches and DDP averages gradients over DP, so the gradient is that of
the mean over the global batch. Logged values are exact global means (per-example sums and
counts reduced over micro-batches, DP and the pipeline: ``reduce_step_metrics``), never the
schedule's divided tensor; the step's MFU is policy model FLOP/s per device over the device peak.

Non-finite values: after the backward the loss and every rank's gradients are checked before
the optimizer reads them; a NaN or infinity raises ``NonFiniteError`` naming the step
(``selm_mcore.train.guards``) before the update is applied. ``check_parameters`` does the same
for the parameters before a save.

Shape legend: B examples per micro-batch, S = 2 or 3 sequences per example, N = S * B, T tokens.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.batches import micro_batches
from selm_mcore.data.packing import PackedBatch
from selm_mcore.mcore.forward import (
    MicroBatch,
    collate_micro_batches,
    forward_only_logps,
    length_multiple,
    pack_micro_batches,
    run_micro_batches,
    sequence_logps,
)
from selm_mcore.mcore.parallel import ParallelContext
from selm_mcore.modelspec import ModelShape, forward_flops, packed_forward_flops
from selm_mcore.train.guards import loss_fn_for_step, raise_non_finite
from selm_mcore.train.metrics import peak_memory_gib

if TYPE_CHECKING:
    from selm_mcore.train.build import Training

logger = logging.getLogger(__name__)

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


def step_counts(micro_batch: MicroBatch, shape: ModelShape) -> torch.Tensor:
    """float64 [4] on the host: the micro-batch's examples, tokens fed, tokens computed and model
    FLOPs (policy forward + backward = 3 forwards of the layout actually computed)."""
    batch = micro_batch.batch
    if isinstance(batch, PackedBatch):
        flops = 3.0 * packed_forward_flops(shape, batch.segments.tolist(), batch.head_index.numel())
    else:
        flops = 3.0 * forward_flops(shape, micro_batch.sequence_lengths)
    return torch.tensor(
        [batch.num_examples, micro_batch.num_tokens, micro_batch.num_computed, flops],
        dtype=torch.float64,
    )


def selm_step_loss(
    micro_batch: MicroBatch,
    logits: torch.Tensor,
    *,
    cfg: SelmConfig,
    tp_group,
    vocab_size: int,
):
    """Loss of one micro-batch on the last stage: (mean loss, per-example sums for logging).

    Everything it reads besides the logits (reference log-probs, response lengths, counts) was
    made on the host and moved with the micro-batch before the schedule: no host sync here.
    """
    from selm_mcore.train.loss import selm_loss

    batch = micro_batch.batch
    policy_chosen, policy_rejected, policy_yref = batch.split(
        sequence_logps(logits, batch, tp_group=tp_group, vocab_size=vocab_size)
    )
    # train_step sets both before the schedule runs
    assert micro_batch.ref_logps is not None and micro_batch.counts is not None
    ref_chosen, ref_rejected, ref_yref = batch.split(micro_batch.ref_logps)
    response_lengths = batch.response_lengths()
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
    counts = micro_batch.counts
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


def reduce_step_metrics(
    reduced: list[dict[str, torch.Tensor]], ctx: ParallelContext
) -> dict[str, float]:
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
        local_sums = torch.stack(
            [
                torch.stack([r[name].detach().double() if name in r else zero for name in names])
                for r in reduced
            ]
        ).sum(0)
        local_produced = torch.tensor(
            [float(name in reduced[0]) for name in names], dtype=torch.float64, device=ctx.device
        )
        totals = torch.cat([local_sums, local_produced])
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


def step_micro_batches(run: Training, indices: list[int]) -> list[MicroBatch]:
    """This DP rank's micro-batches of one step, on the host: packed rows or padded [S*B, T]
    batches, each with its counts (``step_counts``)."""
    cfg, ctx = run.cfg, run.ctx
    # Sequence parallelism needs T to be a multiple of tp (a no-op without it).
    pad_to_multiple_of = length_multiple(cfg.data.pad_to_multiple_of, run.models)
    if run.data.packed:
        batches = pack_micro_batches(
            run.data.dataset,
            indices,
            budget=run.data.pack_tokens,
            shared_prompt=cfg.data.packing == "shared_prompt",
            pad_id=run.pad_id,
            pad_to_multiple_of=pad_to_multiple_of,
            fixed_length=ctx.pp > 1,
            num_microbatches_multiple=ctx.pp if ctx.vpp else 1,
            examples_per_step=len(indices),
        )
    else:
        batches = collate_micro_batches(
            run.data.dataset,
            micro_batches(indices, cfg.train.micro_batch_size),
            pad_id=run.pad_id,
            pad_to_multiple_of=pad_to_multiple_of,
            seq_length=cfg.data.seq_length(),
        )
    for micro_batch in batches:
        micro_batch.counts = step_counts(micro_batch, run.model_shape)
    return batches


def train_step(run: Training, indices: list[int]) -> dict[str, float]:
    """One optimizer step on this DP rank's examples ``indices``; returns the step's metrics."""
    cfg, ctx = run.cfg, run.ctx
    start = time.perf_counter()
    batches = step_micro_batches(run, indices)
    if run.ref_models is None:
        cache = run.data.reference_cache
        assert cache is not None  # reference_mode=precomputed: loaded by load_round_data
        for micro_batch in batches:
            micro_batch.ref_logps = cache.for_batch(micro_batch.batch)
    # Everything the micro-batches need goes to the device now, before the schedule runs.
    batches = [micro_batch.to(ctx.device) for micro_batch in batches]
    if run.ref_models is not None:
        ref_logps = forward_only_logps(run.ref_models, ctx, batches, run.models[0].true_vocab_size)
        for micro_batch, logps in zip(batches, ref_logps or []):
            micro_batch.ref_logps = logps

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


def check_parameters(run: Training) -> None:
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
