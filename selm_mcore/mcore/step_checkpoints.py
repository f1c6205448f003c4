"""Step checkpoints of a training round: the model plus what a resume needs to continue.

    save_checkpoint(OUT/checkpoints, step, models=..., optimizer=..., ...)   # every rank
    path = find_latest(OUT/checkpoints)                                       # or None
    state = load_training_state(path, models=..., optimizer=..., scheduler=..., ctx=ctx)

A step checkpoint is a model checkpoint folder (``selm_mcore.mcore.checkpoint``, which owns the
folder layout) plus ``train/``: optimizer/ (the distributed optimizer's state,
``selm_mcore.mcore.optim``), rng/rank_*.safetensors (each rank's torch and Megatron-tracker RNG
states), state.json (step, scheduler, data position, layout, what defines the run) and
checksums.json (of the files of train/, written last). They live in
``OUT/checkpoints/step_0000040/`` with ``OUT/checkpoints/latest`` naming the newest complete one.
Every rank writes into a fresh ``.<name>.<random>.tmp`` folder first (``shared_temp_dir``: never a
planted link; what an interrupted save left is removed); rank 0 renames it into place and only
then updates ``latest``, so a crash leaves either the previous checkpoint or the new one, never
a half-written folder that ``latest`` names. ``keep`` prunes older ones.

Optimizer state format (recorded in state.json as ``optimizer.format``): in-round checkpoints
are ``dp_reshardable`` (each rank writes its own shard, no gather: fast, no host copy of the
whole state) and the round's last one ``fully_reshardable`` (``save_checkpoint(reshardable=
True)``; every one with ``train.reshardable_checkpoints``). Resume at another layout: the model
always reshards; a fully reshardable optimizer state loads at any tp/pp/vpp/dp, a dp_reshardable
one only at the tp/pp/vpp and gradient buckets it was saved with (any dp), otherwise the resume
is refused naming the fix. The RNG states are restored only when tp, pp and dp match
(dropout-free training does not depend on them).

Loading reads json and safetensors only, after checking the files against their checksums
(shared among the ranks); a missing, truncated or changed file raises ``ChecksumError`` naming
it and the previous kept step checkpoint to resume from (``checkpoint.corruption_fix``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selm_mcore.mcore.checkpoint import (
    LATEST_FILE,
    STEP_PREFIX,
    ResumeError,
    barrier,
    corruption_fix,
    save_model_checkpoint,
    shared_temp_dir,
)
from selm_mcore.mcore.checksums import record_checksums, verify_checksums_together
from selm_mcore.mcore.parallel import ParallelContext
from selm_mcore.runtime.errors import naming_write_errors
from selm_mcore.runtime.files import replace_dir, verify_checksums, write_text_atomic

logger = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "selm-train-state/1"


@dataclass
class TrainState:
    """What ``load_training_state`` restores besides tensors: the step and the data position."""

    step: int
    data: dict[str, int]
    scheduler: dict[str, Any]
    extra: dict[str, Any]
    # {"format": dp_reshardable | fully_reshardable, "layout": what a dp_reshardable state
    # needs to match}; empty for checkpoints written before the format was recorded.
    optimizer: dict[str, Any] = field(default_factory=dict)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def _latest_target(root: Path, latest: Path) -> Path:
    """The folder ``latest`` names: a plain name of a folder directly inside ``root``; a path
    (``../x``, ``/abs``, ``a/b``) or a symlink leading out of ``root`` is refused."""
    name = latest.read_text().strip()
    fix = (
        f"write the name of a step folder of {root} (e.g. {step_dir_name(1)}) into it, or "
        "delete it to start over"
    )
    if not name or name != Path(name).name or name in (".", ".."):
        raise ResumeError(
            f"{latest} names {name!r}, not a folder inside {root} (only a plain "
            f"folder name is accepted); {fix}"
        )
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ResumeError(
            f"{latest} names {path}, a link leading out of {root}; checkpoints "
            f"are read only from inside their folder; {fix}"
        )
    return path


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (named by ``root/latest``), or None."""
    root = Path(root)
    latest = root / LATEST_FILE
    if latest.is_symlink():
        raise ResumeError(
            f"{latest} is a symlink; it must be a file naming a step folder of "
            f"{root}; delete it to start over"
        )
    if not latest.is_file():
        return None
    path = _latest_target(root, latest)
    if not (path / "train" / "state.json").is_file():
        raise ResumeError(
            f"{latest} names {path}, which is not a complete checkpoint (no "
            "train/state.json); delete the folder and the `latest` file to "
            "restart, or point train.output_dir elsewhere"
        )
    return path


def _rng_tensors() -> dict[str, torch.Tensor]:
    from megatron.core import tensor_parallel

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{name}"] = state
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _set_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker_states = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("tracker/")}
    if tracker_states:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)


def _layout(ctx: ParallelContext) -> dict[str, Any]:
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "vpp": ctx.vpp, "dp": ctx.dp}


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    models: Sequence,
    optimizer,
    scheduler,
    data_state: dict[str, int],
    ctx: ParallelContext,
    hf_config,
    tokenizer_dir: str | Path | None,
    keep: int = 0,
    extra: dict[str, Any] | None = None,
    reshardable: bool = True,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (every rank calls this).

    ``models`` are the unwrapped GPTModel chunks whose weights are current (with overlapped
    parameter all-gathers: after ``optim.sync_params``); ``extra`` (JSON) is stored in
    state.json. ``reshardable``: the optimizer state in the fully reshardable format (resumable
    at any layout), else dp_reshardable (no gather; resumable at the same tp/pp/vpp).
    """
    from safetensors.torch import save_file

    from selm_mcore.mcore.optim import (
        DP_RESHARDABLE,
        FULLY_RESHARDABLE,
        distributed_optimizers,
        optimizer_state_layout,
        save_optimizer_state,
    )

    root = Path(root)
    final = root.absolute() / step_dir_name(step)
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    tmp = shared_temp_dir(final, ctx, ["train/optimizer", "train/rng"])
    save_model_checkpoint(models, ctx, tmp, hf_config, tokenizer_dir)
    sharding = FULLY_RESHARDABLE if reshardable else DP_RESHARDABLE
    with naming_write_errors(tmp / "train" / "optimizer"):
        save_optimizer_state(optimizer, models, tmp / "train" / "optimizer", sharding=sharding)
    rng_file = tmp / "train" / "rng" / f"rank_{ctx.rank:05d}.safetensors"
    with naming_write_errors(rng_file):
        save_file(_rng_tensors(), str(rng_file))
    barrier(ctx)
    if ctx.rank == 0:
        layout = optimizer_state_layout(ctx, distributed_optimizers(optimizer)[0].ddp_config)
        state = {
            "format": TRAIN_STATE_FORMAT,
            "step": step,
            "data": data_state,
            "scheduler": scheduler.state_dict(),
            "layout": _layout(ctx),
            "optimizer": {"format": sharding, "layout": layout},
            "extra": extra or {},
        }
        with naming_write_errors(tmp / "train" / "state.json"):
            (tmp / "train" / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    record_checksums(tmp / "train", ctx)
    if ctx.rank == 0:
        replace_dir(tmp, final)
        write_text_atomic(root / LATEST_FILE, final.name + "\n")
        if keep > 0:
            older = sorted(
                p
                for p in root.glob(f"{STEP_PREFIX}*")
                if p.is_dir() and p.name != final.name and p.name < final.name
            )
            for path in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(path, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier(ctx)
    return final


def _read_state_json(state_path: Path) -> dict:
    """state.json of a step checkpoint; an unreadable one names the file and the fix."""
    fix = (
        "resume from an older checkpoint (write its folder name into the `latest` file next "
        "to it) or set train.resume=false"
    )
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"cannot read {state_path}: {exc}; {fix}") from None
    if not isinstance(state, dict):
        raise ResumeError(f"{state_path} holds {type(state).__name__}, not a JSON object; {fix}")
    return state


def load_rng_file(rng_file: Path) -> dict[str, torch.Tensor]:
    """One rank's RNG states; an unreadable file names itself and the fix."""
    from safetensors.torch import load_file

    try:
        return load_file(str(rng_file))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ResumeError(
            f"cannot read RNG file {rng_file}: {type(exc).__name__}: {exc}; resume from an older "
            "checkpoint (write its folder name into `latest`) or set train.resume=false"
        ) from None


def read_train_state(path: str | Path) -> TrainState:
    """The JSON part of a checkpoint (step, data position, scheduler, extra)."""
    state_path = Path(path) / "train" / "state.json"
    verify_checksums(state_path.parent, ["state.json"], fix=corruption_fix(path))  # if listed
    state = _read_state_json(state_path)
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ResumeError(
            f"{state_path} has format {state.get('format')!r}, this version reads "
            f"{TRAIN_STATE_FORMAT!r}"
        )
    return TrainState(
        step=int(state["step"]),
        data=state["data"],
        scheduler=state["scheduler"],
        extra={**state.get("extra", {}), "layout": state.get("layout", {})},
        optimizer=state.get("optimizer", {}),
    )


def load_training_state(
    path: str | Path, *, models: Sequence, optimizer, scheduler, ctx: ParallelContext
) -> TrainState:
    """Restore optimizer, scheduler and (same layout only) RNG from checkpoint ``path``.

    The model weights come from the same folder through ``build_model_from_checkpoint`` (before
    the optimizer is built); returns the step and data position to continue from.
    """
    from selm_mcore.mcore.optim import (
        DP_RESHARDABLE,
        OPTIMIZER_SHARDING,
        check_optimizer_state_layout,
        distributed_optimizers,
        load_optimizer_state,
        optimizer_state_layout,
    )

    path = Path(path)
    verify_checksums_together(path / "train", ctx, fix=corruption_fix(path))
    state = read_train_state(path)
    sharding = state.optimizer.get("format", OPTIMIZER_SHARDING["distrib_optim_sharding_type"])
    if sharding == DP_RESHARDABLE:
        current = optimizer_state_layout(ctx, distributed_optimizers(optimizer)[0].ddp_config)
        check_optimizer_state_layout(path, sharding, state.optimizer.get("layout", {}), current)
    load_optimizer_state(optimizer, models, path / "train" / "optimizer", sharding=sharding)
    scheduler.load_state_dict(state.scheduler)
    saved_layout = state.extra.get("layout", {})
    rng_file = path / "train" / "rng" / f"rank_{ctx.rank:05d}.safetensors"
    if saved_layout == _layout(ctx) and rng_file.is_file():
        _set_rng_tensors(load_rng_file(rng_file))
    else:
        logger.warning(
            "checkpoint %s was saved at layout %s, this run is %s: RNG states are not "
            "restored (training without dropout does not depend on them)",
            path,
            saved_layout,
            _layout(ctx),
        )
    logger.info("resumed from %s at step %d", path, state.step)
    return state
