"""One round of SELM training on Megatron-Core: ``selm train CONFIG [--set a.b=v ...]``.

    selm refpass CONFIG --set train.output_dir=OUT          # reference log-probs, once
    selm train   CONFIG --set train.output_dir=OUT          # then train (resumes if interrupted)
    selm train   CONFIG --set train.output_dir=OUT --overwrite   # train again over OUT/final
    torchrun --nproc-per-node 4 -m selm_mcore.cli train CONFIG --set parallel.tp=2 parallel.pp=2

``train_round`` reads top to bottom: ``load_round_data`` (data and reference log-probs, before
any process group exists, so a stale cache or bad data fails first) and ``build_training``
(policy, frozen reference, DDP, optimizer, schedule, the resumed step: ``selm_mcore.train.build``),
then ``run_steps``: ``train_step`` (``selm_mcore.train.step``: micro-batches, the SELM / DPO / IPO
loss, exact global metrics, the non-finite checks) until the round's steps are done, with step
checkpoints, then the final model.

Outputs in ``train.output_dir``:
    final/                 the trained policy: a Megatron checkpoint folder (docs/architecture.md)
    checkpoints/step_*/    with train.save_interval > 0: every N steps and at the end, with the
                           optimizer, scheduler, data position and RNG (the optimizer state
                           dp-reshardable in the round, fully reshardable at the end or with
                           train.reshardable_checkpoints; selm_mcore.mcore.step_checkpoints;
                           the last one dp-reshardable too when its gather would not fit the
                           nodes' host memory, checked before the round trains:
                           selm_mcore.plan.host_memory)
    metrics.jsonl          one record per step (rank 0); tensorboard/ with train.tensorboard
    ref_logps.safetensors  the reference cache, when train.ref_cache is not set

One writer per output folder: ``selm train`` holds ``.OUT.lock`` beside it while it runs and a
second writer is refused at once, naming the holder's pid. A finished model (``OUT/final``) is
never replaced silently: without ``--overwrite`` the command refuses before loading anything
(an interrupted run without ``final/`` resumes as usual).

Non-finite values: a NaN or infinity in the loss or a gradient stops the run with
``NonFiniteError`` naming the step, before the update is applied and before anything is saved.
The step checkpoints on disk stay as they were (``latest`` names the last good one), no final
model is written, and metrics.jsonl holds the bad step's values. The parameters are checked
again before every save.

Resume: a step checkpoint stores what defines the run (``selm_mcore.train.guards.run_identity``: the
start model's fingerprint, the data hash, the loss and optimizer settings, the number of steps;
nothing that depends on tp/pp/dp/vpp or the packing layout); a resume whose run differs is
refused with ``ResumeError`` naming each differing key before any model is loaded.

Fault hooks (tests): with ``SELM_TRAIN_KILL_AFTER_STEP=k`` every rank SIGKILLs itself right after
step k (and its checkpoint, if one is due), as a crash would; ``SELM_TRAIN_NAN_AT_STEP=k``
makes the loss of step k NaN (``selm_mcore.train.guards``).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from selm_mcore.config.io import add_config_arguments, config_from_args
from selm_mcore.config.schema import SelmConfig
from selm_mcore.mcore.checkpoint import hf_files_dir
from selm_mcore.runtime.outputs import add_overwrite_argument, output_locks, refuse_finished
from selm_mcore.runtime.preflight import (
    check_model_run,
    check_output_dir,
    model_bytes,
    step_checkpoint_bytes,
)
from selm_mcore.train.build import Training, build_training, load_round_data
from selm_mcore.train.guards import NonFiniteError
from selm_mcore.train.metrics import StepMetricsWriter
from selm_mcore.train.step import check_parameters, train_step

logger = logging.getLogger(__name__)

KILL_AFTER_STEP_ENV = "SELM_TRAIN_KILL_AFTER_STEP"


def _maybe_kill_after(step: int) -> None:
    value = os.environ.get(KILL_AFTER_STEP_ENV)
    if value and int(value) == step:
        logger.warning("%s=%s: killing this rank after step %d", KILL_AFTER_STEP_ENV, value, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def step_checkpoint_reshardable(
    cfg: SelmConfig, step: int, total_steps: int, last_reshardable: bool = True
) -> bool:
    """Whether checkpoint ``step`` stores the optimizer state fully reshardable: the round's
    last one (or every one with train.reshardable_checkpoints); in-round ones are
    dp_reshardable (no gather; the same tp/pp/vpp resumes them). ``last_reshardable``: False
    when the last one's gather does not fit the host memory (``last_save_reshardable``)."""
    return cfg.train.reshardable_checkpoints or (step == total_steps and last_reshardable)


def last_save_reshardable(cfg: SelmConfig, ctx) -> bool:
    """Whether the round's last step checkpoint can gather its optimizer state fully
    reshardable within each node's host memory (``selm_mcore.plan.host_memory``), decided
    before the round trains, the same on every rank: False (with a warning) when some node
    lacks the memory; HostMemoryError on every rank when train.reshardable_checkpoints asks
    for the gather anyway."""
    import torch.distributed as dist

    from selm_mcore.modelspec import ModelShape
    from selm_mcore.plan import host_memory
    from selm_mcore.plan.memory import Layout

    if not cfg.train.save_interval:
        return True  # no step checkpoints, no gather
    shape = ModelShape.from_dir(
        hf_files_dir(cfg.start_model()), vocab_divisible_by=cfg.model.make_vocab_size_divisible_by
    )
    layout = Layout(tp=ctx.tp, pp=ctx.pp, vpp=ctx.vpp, dp=ctx.dp)
    node, per_node = host_memory.local_node(ctx.rank, ctx.world_size)
    needed = host_memory.gather_bytes_per_node(shape, layout, per_node).get(node, 0)
    processes = sum(r // per_node == node for r, _ in host_memory.dp_rank0_ranks(layout))
    if cfg.train.host_memory_gb:
        available = int(cfg.train.host_memory_gb * 2**30)
        source = f"train.host_memory_gb={cfg.train.host_memory_gb:g} allows"
    else:
        available, source = host_memory.available_host_bytes(), "available on it"
    try:
        verdict = host_memory.last_save_format(
            cfg.train.reshardable_checkpoints, node, needed, processes, available, source
        )
    except host_memory.HostMemoryError as exc:
        verdict = ("error", str(exc))
    verdicts: list = [None] * ctx.world_size
    dist.all_gather_object(verdicts, verdict)
    errors = [message for fmt, message in verdicts if fmt == "error"]
    if errors:
        raise host_memory.HostMemoryError(errors[0])
    warnings = [message for fmt, message in verdicts if fmt == "dp_reshardable"]
    if warnings and ctx.rank == 0:
        logger.warning("%s", warnings[0])
    return not warnings


def save_step_checkpoint(run: Training, root: Path) -> None:
    """Step checkpoint ``run.step`` under ``root`` (every rank calls this)."""
    from selm_mcore.mcore.optim import sync_params
    from selm_mcore.mcore.step_checkpoints import save_checkpoint

    sync_params(run.ddp_models)  # the weights of this step (overlapped all-gather)
    check_parameters(run)
    save_checkpoint(
        root,
        run.step,
        data_state=run.sampler.state_dict(),
        reshardable=step_checkpoint_reshardable(
            run.cfg, run.step, run.data.total_steps, run.last_save_reshardable
        ),
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


def _log_round_plan(run: Training) -> None:
    cfg, data = run.cfg, run.data
    layout = (
        f"packing {cfg.data.packing} in micro-batches of {data.pack_tokens} tokens"
        if data.packed
        else f"{run.num_microbatches} micro-batches x {cfg.train.micro_batch_size} pairs"
    )
    logger.info(
        "training %d steps (from step %d): %d examples, global batch %d over dp %d, "
        "%s, peak lr %.3g, reference %s",
        data.total_steps,
        run.step,
        len(data.dataset),
        cfg.train.global_batch_size,
        run.ctx.dp,
        layout,
        cfg.optim.lr_for_round(cfg.train.round_index),
        cfg.train.reference_mode,
    )


def run_steps(run: Training, writer: StepMetricsWriter) -> None:
    """Steps until the round's last, each logged, with step checkpoints every
    train.save_interval steps and at the end; the weights are synced and checked for a save."""
    from selm_mcore.mcore.optim import sync_params

    cfg, total_steps = run.cfg, run.data.total_steps
    checkpoints = Path(cfg.train.output_dir) / "checkpoints"
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
        check_parameters(run)
    elif last_saved != run.step:
        save_step_checkpoint(run, checkpoints)


def train_round(cfg: SelmConfig) -> Path:
    """Train one round; returns the folder of the final model (``<output_dir>/final``)."""
    from selm_mcore.mcore.checkpoint import save_model_atomic
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel_from
    from selm_mcore.runtime.deps import check_dependencies
    from selm_mcore.train.wandb_log import open_training_run

    check_dependencies(cfg, phases=("train", "data"))
    check_model_run(cfg, hf_files_dir(cfg.start_model()), job="train")
    check_train_outputs(cfg)
    data = load_round_data(cfg)
    ctx = init_parallel_from(cfg.parallel)
    try:
        reshardable = last_save_reshardable(cfg, ctx)  # before the model is built
        run = build_training(cfg, ctx, data)
        run.last_save_reshardable = reshardable
        output_dir = Path(cfg.train.output_dir)
        writer = StepMetricsWriter(
            output_dir,
            total_steps=data.total_steps,
            enabled=ctx.rank == 0,
            tensorboard=cfg.train.tensorboard,
            resume_step=run.step,
            log_interval=cfg.train.log_interval,
            wandb_run=open_training_run(cfg, output_dir) if ctx.rank == 0 else None,
        )
        _log_round_plan(run)
        run_steps(run, writer)
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
    add_overwrite_argument(parser, "the trained model train.output_dir/final")


def main(args) -> int:
    cfg = config_from_args(args)
    output_dir = Path(cfg.train.output_dir)
    with output_locks({output_dir: "train.output_dir"}, command="selm train"):
        refuse_finished(
            output_dir / "final",
            setting="train.output_dir",
            overwrite=args.overwrite,
            what="a trained model",
        )
        train_round(cfg)
    return 0
