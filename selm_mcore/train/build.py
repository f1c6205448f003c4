"""What one round of training works with, built once: ``load_round_data``, ``build_training``.

    data = load_round_data(cfg)            # before any process group: bad data fails first
    ctx = init_parallel(...)
    run = build_training(cfg, ctx, data)   # policy, reference, DDP, optimizer, schedule, sampler

``load_round_data`` reads the rows, tokenises them and loads the precomputed reference
log-probs (checking the cache key), so a stale cache or a bad row stops the round before a model
is built. ``build_training`` loads the policy from ``train.init_from`` or ``model.hf_dir`` (a
Megatron checkpoint folder or an HF folder, which is also the frozen reference), or from the
newest step checkpoint of ``train.output_dir`` when there is one (after checking that the
checkpoint's run identity is this run's: ``selm_mcore.train.guards``), and wraps it in Megatron
DDP with the distributed optimizer (AdamW) and the warm-up + cosine / linear / constant
schedule. The steps that use the result: ``selm_mcore.train.step``; the round loop and
``selm train``: ``selm_mcore.train.trainer``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.batches import DistributedBatchSampler
from selm_mcore.data.packing import pack_budget
from selm_mcore.data.tokenize import (
    PreferenceDataset,
    load_preferences,
    load_tokenizer,
    pad_token_id,
)
from selm_mcore.mcore.checkpoint import DTYPES, hf_files_dir
from selm_mcore.mcore.families import check_model_config_dir
from selm_mcore.mcore.forward import token_multiple
from selm_mcore.mcore.parallel import ParallelContext, sequence_length_multiple
from selm_mcore.modelspec import ModelShape
from selm_mcore.runtime.errors import InputError
from selm_mcore.train.guards import check_resume, run_identity
from selm_mcore.train.metrics import device_peak
from selm_mcore.train.refkey import reference_fingerprint, reference_key
from selm_mcore.train.refpass import ReferenceLogps, load_reference_cache
from selm_mcore.train.step import selm_step_loss


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
    check_model_config_dir(hf_files_dir(source), max_length=cfg.data.max_length)
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
            cfg.data,
            dataset.examples,
            multiple=sequence_length_multiple(cfg.parallel.tp, cfg.parallel.sequence_parallel),
        ),
        source_fingerprint=fingerprint or reference_fingerprint(source),
    )


@dataclass
class Training:
    """Everything the steps of a round use, built once by ``build_training``."""

    cfg: SelmConfig
    ctx: ParallelContext
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
    model_shape: ModelShape  # the policy's shape (model FLOPs of each micro-batch)
    # The round's last step checkpoint in the fully reshardable format (False: the host memory
    # of its gather does not fit; selm_mcore.plan.host_memory).
    last_save_reshardable: bool = True

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per step of packing none (packed steps have as many as the rows)."""
        return self.cfg.train.global_batch_size // (self.ctx.dp * self.cfg.train.micro_batch_size)


def _resume_checkpoint(cfg: SelmConfig, data: RoundData) -> tuple[Path | None, dict[str, Any]]:
    """(the step checkpoint to resume from or None, this run's identity); a checkpoint of
    another run is refused here, before any model is loaded."""
    from selm_mcore.mcore.step_checkpoints import find_latest, read_train_state

    checkpoints = Path(cfg.train.output_dir) / "checkpoints"
    resume_from = find_latest(checkpoints) if cfg.train.resume else None
    identity = run_identity(
        cfg,
        start_model=data.source_fingerprint,
        data_hash=data.dataset.content_hash(),
        steps=data.total_steps,
    )
    if resume_from is not None:
        check_resume(resume_from, read_train_state(resume_from).extra.get("run"), identity)
    return resume_from, identity


def _load_models(
    cfg: SelmConfig,
    ctx: ParallelContext,
    data: RoundData,
    resume_from: Path | None,
    policy: tuple[list, Any] | None,
) -> tuple[list, Any, list | None]:
    """(policy chunks, HF config, frozen reference chunks or None) of the round, checked against
    the data (token ids within the vocabulary, packed rows split over the ranks)."""
    from selm_mcore.mcore.checkpoint import load_frozen_policy, load_policy

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
    return models, hf_config, ref_models


def build_training(
    cfg: SelmConfig,
    ctx: ParallelContext,
    data: RoundData,
    *,
    policy: tuple[list, Any] | None = None,
) -> Training:
    """Policy (resumed from ``<output_dir>/checkpoints/latest`` when there is one), reference,
    DDP, optimizer, schedule and sampler of a round. ``policy``: (model chunks, HF config)
    built by the caller instead of loaded (the benchmarks' shape-only random models)."""
    from selm_mcore.mcore.optim import build_lr_scheduler, build_optimizer, wrap_ddp
    from selm_mcore.mcore.step_checkpoints import load_training_state

    cfg.validate(world_size=ctx.world_size)
    resume_from, identity = _resume_checkpoint(cfg, data)
    models, hf_config, ref_models = _load_models(cfg, ctx, data, resume_from, policy)
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
        model_shape=ModelShape.from_hf_config(hf_config),
    )
