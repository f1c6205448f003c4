"""One round of SELM training on Megatron-Core: ``selm train CONFIG [--set a.b=v ...]``.

    selm refpass CONFIG --set train.output_dir=OUT          # reference log-probs, once
    selm train   CONFIG --set train.output_dir=OUT          # then train (resumes if interrupted)
    torchrun --nproc-per-node 4 -m selm_mcore.cli train CONFIG --set parallel.tp=2 parallel.pp=2

Reads top to bottom in ``train_round``: the policy starts from ``train.init_from`` (a Megatron
checkpoint folder or an HF folder; default ``model.hf_dir``), which is also the frozen reference.
Each optimizer step takes ``train.global_batch_size`` examples (``DistributedBatchSampler``, a
slice per DP rank), splits them into micro-batches of ``train.micro_batch_size`` examples, each
one [S*B, T] forward of its chosen, rejected and y_ref sequences, and runs Megatron's
``get_forward_backward_func`` (1F1B; interleaved with ``parallel.vpp``). The loss (SELM /
DPO / IPO, ``selm_mcore.loss``) is computed on the last pipeline stage from the fused
vocab-parallel log-probs and the reference log-probs: precomputed by ``selm refpass``
(``train.reference_mode=precomputed``; the cache key is checked) or computed on the fly by a
frozen copy (``onthefly``). Megatron DDP + the distributed optimizer (AdamW), warm-up + cosine /
linear / constant schedule (``OptimizerParamScheduler``), gradient clipping, bf16 with
``model.dtype=bf16``, activation recompute with ``model.recompute``.

Loss scaling: each micro-batch returns the mean loss of its B examples; the schedule divides it
by the number of micro-batches and DDP averages gradients over DP, so the gradient is that of
the mean over the global batch. Logged values are exact global means (per-example sums and
counts reduced over micro-batches, DP and the pipeline), never the schedule's divided tensor.

Outputs in ``train.output_dir``:
    final/                 the trained policy: a Megatron checkpoint folder (docs/architecture.md)
    checkpoints/step_*/    with train.save_interval > 0: every N steps and at the end, with the
                           optimizer, scheduler, data position and RNG (selm_mcore.checkpoint)
    metrics.jsonl          one record per step (rank 0); tensorboard/ with train.tensorboard
    ref_logps.safetensors  the reference cache, when train.ref_cache is not set

Fault hook (tests): with ``SELM_TRAIN_KILL_AFTER_STEP=k`` every rank SIGKILLs itself right after
step k (and its checkpoint, if one is due), as a crash would.

Shape legend: B examples per micro-batch, S = 2 or 3 sequences per example, N = S * B, T tokens.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selm_mcore.config import OptimConfig, SelmConfig, add_config_arguments, config_from_args
from selm_mcore.refpass import (
    MicroBatch,
    collate_micro_batches,
    hf_files_dir,
    load_dataset,
    load_frozen_model,
    load_reference_cache,
    load_start_model,
    load_tokenizer,
    micro_batch_reference_logps,
    pad_token_id,
    ref_cache_path,
    reference_key,
    reference_source,
    run_micro_batches,
    sequence_logps,
)

logger = logging.getLogger(__name__)

KILL_AFTER_STEP_ENV = "SELM_TRAIN_KILL_AFTER_STEP"
# Per-example metric sums reduced each step, in a fixed order (every rank builds the same vector).
SUMMED_METRICS = (
    "loss", "loss/preference", "loss/optimism", "loss/sft",
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected",
    "logps/pi_response", "logps/ref_response",
)
COUNTS = ("num_examples", "num_tokens")


# --- optimizer and schedule -------------------------------------------------------------------


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


# --- one step ---------------------------------------------------------------------------------


def selm_step_loss(micro_batch: MicroBatch, logits: torch.Tensor, *, cfg: SelmConfig, tp_group,
                   vocab_size: int):
    """Loss of one micro-batch on the last stage: (mean loss, per-example sums for logging)."""
    from selm_mcore.loss import selm_loss

    batch = micro_batch.batch
    policy_chosen, policy_rejected, policy_yref = batch.split(
        sequence_logps(logits, batch, tp_group=tp_group, vocab_size=vocab_size))
    ref_chosen, ref_rejected, ref_yref = batch.split(micro_batch.ref_logps.to(logits.device))
    chosen_tokens, rejected_tokens, _ = batch.split(batch.loss_mask.sum(-1))
    loss, metrics = selm_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, policy_yref, ref_yref,
        beta=cfg.loss.beta, alpha=cfg.loss.alpha, loss_type=cfg.loss.loss_type,
        sft_weight=cfg.loss.sft_weight, chosen_num_tokens=chosen_tokens,
        rejected_num_tokens=rejected_tokens)
    counts = torch.tensor([batch.num_examples, micro_batch.num_tokens], dtype=torch.float64,
                          device=logits.device)
    sums = {"loss": loss.detach().sum(), "num_examples": counts[0], "num_tokens": counts[1]}
    sums.update({name: value.sum() for name, value in metrics.items()})
    return loss.mean(), sums


def reduce_step_metrics(reduced: list[dict[str, torch.Tensor]], ctx) -> dict[str, float]:
    """Global means of the per-example sums (every rank calls this; all get the result).

    The last stage sums its micro-batches; a sum over DP and then over the pipeline (other
    stages contribute zeros) gives every rank the totals. Metrics this run does not produce
    (e.g. no y_ref) are NaN and dropped.
    """
    names = SUMMED_METRICS + COUNTS
    totals = torch.zeros(len(names), dtype=torch.float64, device=ctx.device)
    if ctx.is_last_stage and reduced:
        missing = torch.tensor(float("nan"), dtype=torch.float64, device=ctx.device)
        totals = torch.stack([
            torch.stack([r[name].detach().double() if name in r else missing for name in names])
            for r in reduced]).sum(0)
    if ctx.dp > 1:
        dist.all_reduce(totals, group=ctx.dp_group)
    if ctx.pp > 1:
        dist.all_reduce(totals, group=ctx.pp_group)
    sums = dict(zip(names, totals.tolist()))
    count = sums["num_examples"]
    out = {name: sums[name] / count for name in SUMMED_METRICS if not math.isnan(sums[name])}
    out.update({name: sums[name] for name in COUNTS})
    return out


def _maybe_kill_after(step: int) -> None:
    value = os.environ.get(KILL_AFTER_STEP_ENV)
    if value and int(value) == step:
        logger.warning("%s=%s: killing this rank after step %d", KILL_AFTER_STEP_ENV, value, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


# --- the round --------------------------------------------------------------------------------


def total_train_steps(cfg: SelmConfig, num_examples: int) -> int:
    """Optimizer steps of the round: train.max_steps if set, else epochs * full batches."""
    steps_per_epoch = num_examples // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_examples} examples in data.train_path are fewer than "
                         f"train.global_batch_size={cfg.train.global_batch_size}")
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch


def _num_microbatches(cfg: SelmConfig, ctx) -> int:
    """Micro-batches per step on each DP rank (the global batch must split evenly)."""
    if cfg.train.global_batch_size % (ctx.dp * cfg.train.micro_batch_size):
        raise ValueError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"data-parallel size ({ctx.dp}) * train.micro_batch_size "
            f"({cfg.train.micro_batch_size})")
    return cfg.train.global_batch_size // (ctx.dp * cfg.train.micro_batch_size)


def train_round(cfg: SelmConfig) -> Path:
    """Train one round; returns the folder of the final model (``<output_dir>/final``)."""
    from selm_mcore.checkpoint import (
        ResumeError,
        find_latest,
        load_training_state,
        save_checkpoint,
        save_model_atomic,
    )
    from selm_mcore.data import DistributedBatchSampler, micro_batches
    from selm_mcore.metrics import StepMetricsWriter, peak_memory_gib
    from selm_mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.refpass import params_dtype as dtype_of

    # Data and reference log-probs first: a stale cache or bad data fails before any process
    # group or model exists.
    source = reference_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    dataset = load_dataset(cfg, tokenizer)
    if cfg.loss.alpha > 0 and not dataset.has_yref:
        raise ValueError(
            f"loss.alpha={cfg.loss.alpha} needs y_ref: the rows of {cfg.data.train_path} have no "
            "reference_response; generate it (selm generate) or set loss.alpha=0 (iterative DPO)")
    total_steps = total_train_steps(cfg, len(dataset))
    reference_cache = None
    if cfg.train.reference_mode == "precomputed":
        key = reference_key(dataset, source, max_length=cfg.data.max_length,
                            max_prompt_length=cfg.data.max_prompt_length)
        reference_cache = load_reference_cache(ref_cache_path(cfg), key)

    ctx = init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, vpp=cfg.parallel.vpp,
                        seed=cfg.parallel.seed)
    output_dir = Path(cfg.train.output_dir)
    checkpoints = output_dir / "checkpoints"
    try:
        num_microbatches = _num_microbatches(cfg, ctx)
        ref_models = None
        if cfg.train.reference_mode == "onthefly":
            ref_models = load_frozen_model(cfg, ctx, source)

        # Policy: from the latest checkpoint of this run, else from the round's start.
        resume_from = find_latest(checkpoints) if cfg.train.resume else None
        params_dtype = dtype_of(cfg)
        models, hf_config = load_start_model(cfg, ctx, resume_from or source,
                                             recompute=cfg.model.recompute)
        ddp_models = wrap_ddp(models)
        peak_lr = cfg.optim.lr_for_round(cfg.train.round_index)
        optimizer = build_optimizer(ddp_models, cfg.optim, peak_lr=peak_lr,
                                    params_dtype=params_dtype)
        scheduler = build_lr_scheduler(optimizer, cfg.optim, peak_lr=peak_lr,
                                       total_steps=total_steps)
        sampler = DistributedBatchSampler(
            len(dataset), cfg.train.global_batch_size, dp_rank=ctx.dp_rank, dp_size=ctx.dp,
            shuffle=cfg.data.shuffle, seed=cfg.train.seed)
        step = 0
        if resume_from is not None:
            state = load_training_state(resume_from, models=models, optimizer=optimizer,
                                        scheduler=scheduler, ctx=ctx)
            if state.extra.get("data_hash") != dataset.content_hash():
                raise ResumeError(
                    f"cannot resume from {resume_from}: it was trained on other data than "
                    f"{cfg.data.train_path}; set train.resume=false or use another "
                    "train.output_dir")
            step = state.step
            sampler.load_state_dict(state.data)

        writer = StepMetricsWriter(output_dir, total_steps=total_steps, enabled=ctx.rank == 0,
                                   tensorboard=cfg.train.tensorboard, resume_step=step,
                                   log_interval=cfg.train.log_interval)
        logger.info("training %d steps (from step %d): %d examples, global batch %d = %d "
                    "micro-batches x %d x dp %d, peak lr %.3g, reference %s", total_steps, step,
                    len(dataset), cfg.train.global_batch_size, num_microbatches,
                    cfg.train.micro_batch_size, ctx.dp, peak_lr, cfg.train.reference_mode)
        tp_group = ctx.tp_group if ctx.tp > 1 else None
        vocab_size = models[0].true_vocab_size
        loss_fn = functools.partial(selm_step_loss, cfg=cfg, tp_group=tp_group,
                                    vocab_size=vocab_size)
        pad_id = pad_token_id(tokenizer)
        checkpoint_kwargs = dict(models=models, optimizer=optimizer, scheduler=scheduler,
                                 ctx=ctx, hf_config=hf_config, tokenizer_dir=hf_files_dir(source),
                                 keep=cfg.train.keep_checkpoints,
                                 extra={"data_hash": dataset.content_hash()})
        last_saved = step if resume_from is not None else -1
        while step < total_steps:
            if len(sampler) == 0:  # epoch done: the next one (a new order when shuffling)
                sampler = DistributedBatchSampler(
                    len(dataset), cfg.train.global_batch_size, dp_rank=ctx.dp_rank,
                    dp_size=ctx.dp, shuffle=cfg.data.shuffle, seed=cfg.train.seed,
                    epoch=sampler.epoch + 1)
            for indices in sampler:
                start = time.perf_counter()
                batches = collate_micro_batches(
                    dataset, micro_batches(indices, cfg.train.micro_batch_size), pad_id=pad_id,
                    pad_to_multiple_of=cfg.data.pad_to_multiple_of,
                    seq_length=cfg.data.seq_length(), device=ctx.device)
                if ref_models is not None:
                    ref_logps = micro_batch_reference_logps(ref_models, ctx, batches, vocab_size)
                    for micro_batch, logps in zip(batches, ref_logps or []):
                        micro_batch.ref_logps = logps
                else:
                    for micro_batch in batches:
                        micro_batch.ref_logps = reference_cache.for_batch(micro_batch.batch)

                for model in ddp_models:
                    model.zero_grad_buffer()
                optimizer.zero_grad()
                reduced = run_micro_batches(ddp_models, batches, loss_fn, forward_only=False)
                lr = optimizer.param_groups[0]["lr"]
                update_ok, grad_norm, _ = optimizer.step()
                if not update_ok:
                    logger.warning("step %d: optimizer step skipped (non-finite gradients)",
                                   step + 1)
                scheduler.step(1)
                step += 1
                elapsed = time.perf_counter() - start
                metrics = reduce_step_metrics(reduced, ctx)
                metrics.update(grad_norm=grad_norm, lr=lr, step_time_s=elapsed,
                               tokens_per_s=metrics["num_tokens"] / elapsed,
                               memory_gib=peak_memory_gib(ctx.device))
                writer.log(step, metrics)

                if cfg.train.save_interval and (step % cfg.train.save_interval == 0
                                                or step == total_steps):
                    save_checkpoint(checkpoints, step, data_state=sampler.state_dict(),
                                    **checkpoint_kwargs)
                    last_saved = step
                _maybe_kill_after(step)
                if step >= total_steps:
                    break
        writer.close()
        if cfg.train.save_interval and last_saved != step:
            save_checkpoint(checkpoints, step, data_state=sampler.state_dict(),
                            **checkpoint_kwargs)
        final = save_model_atomic(models, ctx, output_dir / "final", hf_config=hf_config,
                                  tokenizer_dir=hf_files_dir(source))
        logger.info("round done: %d steps, final model %s", step, final)
        return final
    finally:
        destroy_parallel()


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def main(args) -> int:
    train_round(config_from_args(args))
    return 0
