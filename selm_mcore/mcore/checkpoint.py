"""The Megatron checkpoint folder: its format, model saves and loads, and step checkpoints.

This module is the one owner of the folder layout (docs/architecture.md)::

    M/selm_checkpoint.json   format, vocab_size, padded_vocab_size, tp, pp, dtype, ...
                             (its presence marks a complete save)
    M/checksums.json         size and sha256 of every file of model/, hf/ and
                             selm_checkpoint.json (written last; ``selm_mcore.mcore.checksums``)
    M/hf/                    HF config.json, generation_config.json, tokenizer files
    M/model/                 Megatron dist checkpoint (torch_dist), global coordinates: any
                             TP/PP/VPP whose tp divides the heads/groups/padded vocabulary loads it
    M/train/                 step checkpoints only: optimizer/ (the distributed optimizer's
                             state, ``selm_mcore.mcore.optim``), rng/rank_*.safetensors (each
                             rank's torch and Megatron-tracker RNG states), state.json (step,
                             scheduler, data position, layout, what defines the run),
                             checksums.json (of the files of train/, written last)

Converter output and a round's final policy are model-only folders; the trainer's step
checkpoints live in ``OUT/checkpoints/step_0000040/`` with ``OUT/checkpoints/latest`` naming the
newest complete one. Every rank writes into a ``.<name>.tmp`` folder first; rank 0 renames it
into place and only then updates ``latest``, so a crash leaves either the previous checkpoint or
the new one, never a half-written folder that ``latest`` names. ``keep`` prunes older ones.

Optimizer state format (recorded in state.json as ``optimizer.format``): in-round checkpoints
are ``dp_reshardable`` (each rank writes its own shard, no gather: fast, no host copy of the
whole state) and the round's last one ``fully_reshardable`` (``save_checkpoint(reshardable=
True)``; every one with ``train.reshardable_checkpoints``). Resume at another layout: the model
always reshards; a fully reshardable optimizer state loads at any tp/pp/vpp/dp, a dp_reshardable
one only at the tp/pp/vpp and gradient buckets it was saved with (any dp), otherwise the resume
is refused naming the fix. The RNG states are restored only when tp, pp and dp match
(dropout-free training does not depend on them).

Loading never unpickles objects a user did not make: json and safetensors here, Megatron's
dist checkpoints through ``selm_mcore.mcore.safe_load``. Loading checks the files against
their checksums first (shared among the ranks); a missing, truncated or changed file raises
``ChecksumError`` naming it and the previous kept step checkpoint to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selm_mcore.mcore.checksums import record_checksums, verify_checksums_together
from selm_mcore.mcore.model import build_model, load_hf_config
from selm_mcore.mcore.parallel import ParallelContext
from selm_mcore.mcore.weights import hf_config_of, load_hf_weights, write_hf_config_files
from selm_mcore.runtime.errors import naming_write_errors
from selm_mcore.runtime.files import (
    read_checksums,
    replace_dir,
    verify_checksums,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "selm-mcore/1"
META_FILE = "selm_checkpoint.json"
TRAIN_STATE_FORMAT = "selm-train-state/1"
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A Megatron checkpoint folder that is missing, incomplete or does not fit the model."""


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed by this run (different data, batch or schedule)."""


# --- the folder -------------------------------------------------------------------------------


def is_megatron_checkpoint(path: str | Path) -> bool:
    """True for a folder in the Megatron checkpoint format (a model folder, not an HF one)."""
    return (Path(path) / META_FILE).is_file()


def hf_files_dir(model_path: str | Path) -> Path:
    """The folder with config.json and tokenizer files of an HF folder or Megatron checkpoint."""
    path = Path(model_path)
    return path / "hf" if is_megatron_checkpoint(path) else path


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


# --- model checkpoints ------------------------------------------------------------------------


def _sharded_state_dict(models: Sequence) -> dict:
    # One sub-dict per chunk: the dict paths differ per chunk, but the storage keys inside the
    # ShardedTensors are global (layer axis, vocab rows), so the checkpoint does not depend on
    # tp, pp or vpp. Modules' "_extra_state" (Transformer Engine FP8 metadata, None in the
    # local spec) is left out, so a checkpoint also moves between the local and the TE spec.
    return {
        f"chunk{i}": {
            key: value
            for key, value in model.sharded_state_dict(prefix="").items()
            if not key.endswith("_extra_state")
        }
        for i, model in enumerate(models)
    }


def save_model_checkpoint(
    models: Sequence,
    ctx: ParallelContext,
    ckpt_dir: str | os.PathLike,
    hf_config=None,
    tokenizer_dir: str | os.PathLike | None = None,
    extra_meta: dict | None = None,
) -> None:
    """Save the model as a selm-mcore checkpoint folder (every rank calls this).

    Writes M/model (Megatron dist checkpoint, torch_dist), M/hf (config + tokenizer files from
    ``tokenizer_dir``) and, last, M/selm_checkpoint.json, whose presence marks a complete save.
    """
    from megatron.core import dist_checkpointing

    hf_config = hf_config if hf_config is not None else hf_config_of(models)
    ckpt_dir = Path(ckpt_dir)
    model_dir = ckpt_dir / "model"
    if ctx.rank == 0:
        if model_dir.exists() and any(model_dir.iterdir()):
            raise CheckpointError(
                f"{model_dir} exists and is not empty; remove it or save to another folder"
            )
        model_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / META_FILE).unlink(missing_ok=True)
    dist.barrier()
    weight_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    with naming_write_errors(model_dir, needed_bytes=weight_bytes):
        dist_checkpointing.save(_sharded_state_dict(models), str(model_dir))
    if ctx.rank == 0:
        write_hf_config_files(
            hf_config, ckpt_dir / "hf", Path(tokenizer_dir) if tokenizer_dir else None
        )
        params_dtype = next(models[0].parameters()).dtype
        meta = {
            "format": CHECKPOINT_FORMAT,
            "vocab_size": hf_config.vocab_size,
            "padded_vocab_size": models[0].vocab_size,
            "num_layers": hf_config.num_hidden_layers,
            "hidden_size": hf_config.hidden_size,
            "tie_word_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
            "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[params_dtype],
            "tp": ctx.tp,
            "pp": ctx.pp,
            "vpp": ctx.vpp,
            **(extra_meta or {}),
        }
        (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    record_checksums(ckpt_dir, ctx, under=("model", "hf", META_FILE))
    dist.barrier()
    logger.info("saved Megatron checkpoint %s", ckpt_dir)


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> dict:
    """selm_checkpoint.json of a checkpoint folder, checked for format and completeness."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{meta_path} not found: {ckpt_dir} is not a complete selm-mcore checkpoint (an "
            "interrupted save, or an HF folder: convert it with tools/convert_hf/hf_to_mcore.py)"
        )
    _verify_small_files(ckpt_dir)
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{meta_path} has format {meta.get('format')!r}, this version "
            f"reads {CHECKPOINT_FORMAT!r}"
        )
    if not (ckpt_dir / "model").is_dir() or not (ckpt_dir / "hf" / "config.json").is_file():
        raise CheckpointError(f"{ckpt_dir} lacks model/ or hf/config.json")
    return meta


def load_model_checkpoint(
    models: Sequence, ctx: ParallelContext, ckpt_dir: str | os.PathLike, meta: dict | None = None
) -> dict:
    """Load a selm-mcore checkpoint into this rank's chunks (any tp/pp/vpp); returns its meta
    (``meta``: as ``read_checkpoint_meta`` already returned it, not read and checked again).

    Raises CheckpointError when the checkpoint's (padded) vocabulary or shape differs from the
    model's: build the model with ``build_model_from_checkpoint`` or
    ``build_model(..., padded_vocab=meta["padded_vocab_size"])``.
    """
    from selm_mcore.mcore.safe_load import load_dist_checkpoint

    ckpt_dir = Path(ckpt_dir)
    meta = meta or read_checkpoint_meta(ckpt_dir)
    hf_config = hf_config_of(models)
    model_padded = models[0].vocab_size
    if meta["vocab_size"] != hf_config.vocab_size or meta["padded_vocab_size"] != model_padded:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was saved with vocab_size={meta['vocab_size']} (padded "
            f"{meta['padded_vocab_size']}), but the model has vocab_size={hf_config.vocab_size} "
            f"(padded {model_padded}); build the model from the checkpoint's hf/config.json with "
            f"padded_vocab={meta['padded_vocab_size']} (selm_mcore.mcore.checkpoint."
            "build_model_from_checkpoint)"
        )
    for key, value in (
        ("num_layers", hf_config.num_hidden_layers),
        ("hidden_size", hf_config.hidden_size),
    ):
        if meta[key] != value:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} has {key}={meta[key]}, the model {key}={value}"
            )
    verify_checksums_together(ckpt_dir, ctx, fix=corruption_fix(ckpt_dir), under=("model",))
    state = load_dist_checkpoint(_sharded_state_dict(models), ckpt_dir / "model")
    for i, model in enumerate(models):
        result = model.load_state_dict(state[f"chunk{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt_dir} did not provide {missing}")
    logger.info(
        "loaded Megatron checkpoint %s (saved at tp=%s pp=%s) at tp=%d pp=%d",
        ckpt_dir,
        meta.get("tp"),
        meta.get("pp"),
        ctx.tp,
        ctx.pp,
    )
    return meta


def build_model_from_checkpoint(
    ckpt_dir: str | os.PathLike,
    ctx: ParallelContext,
    *,
    params_dtype: torch.dtype | None = None,
    recompute: bool = False,
    packed: bool = False,
):
    """(models, hf_config, meta): build the model for a checkpoint folder and load it."""
    meta = read_checkpoint_meta(ckpt_dir)
    hf_config = load_hf_config(Path(ckpt_dir) / "hf")
    dtype = params_dtype or DTYPES[meta.get("dtype", "fp32")]
    models = build_model(
        hf_config,
        ctx,
        params_dtype=dtype,
        padded_vocab=meta["padded_vocab_size"],
        recompute=recompute,
        init_weights=False,
        packed=packed,
    )
    load_model_checkpoint(models, ctx, ckpt_dir, meta)
    return models, hf_config, meta


def load_policy(
    source: str | Path,
    ctx: ParallelContext,
    model_cfg,
    *,
    recompute: bool = False,
    packed: bool = False,
) -> tuple[list, Any]:
    """(model chunks, HF config) of ``source``: a Megatron checkpoint folder or an HF folder.
    ``packed``: the chunks take packed micro-batches (``selm_mcore.mcore.model.build_model``)."""
    dtype = DTYPES[model_cfg.dtype]
    if is_megatron_checkpoint(source):
        models, hf_config, _ = build_model_from_checkpoint(
            source, ctx, params_dtype=dtype, recompute=recompute, packed=packed
        )
        return models, hf_config
    verify_checksums_together(
        source,
        ctx,
        fix=f"export {source} again (selm convert "
        "mcore-to-hf --overwrite) or point at an intact copy",
        expected=False,
    )
    hf_config = load_hf_config(source)
    models = build_model(
        hf_config,
        ctx,
        params_dtype=dtype,
        recompute=recompute,
        make_vocab_size_divisible_by=model_cfg.make_vocab_size_divisible_by,
        init_weights=False,
        packed=packed,
    )
    load_hf_weights(models, source, ctx)
    return models, hf_config


def load_frozen_policy(
    source: str | Path, ctx: ParallelContext, model_cfg, *, packed: bool = False
) -> list:
    """The model chunks of ``source`` in eval mode and without gradients (a reference)."""
    models, _ = load_policy(source, ctx, model_cfg, packed=packed)
    for model in models:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return models


def save_model_atomic(
    models: Sequence,
    ctx: ParallelContext,
    out_dir: str | Path,
    *,
    hf_config,
    tokenizer_dir: str | Path | None,
) -> Path:
    """Save a model-only checkpoint folder via a temp folder renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ctx)
    save_model_checkpoint(models, ctx, tmp, hf_config, tokenizer_dir)
    _barrier(ctx)
    if ctx.rank == 0:
        replace_dir(tmp, out_dir)
    _barrier(ctx)
    return out_dir


# --- step checkpoints (training state) --------------------------------------------------------


@dataclass
class TrainState:
    """What ``load_checkpoint`` restores besides tensors: the step and the data position."""

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
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "train" / "optimizer").mkdir(parents=True)
        (tmp / "train" / "rng").mkdir()
    _barrier(ctx)
    save_model_checkpoint(models, ctx, tmp, hf_config, tokenizer_dir)
    sharding = FULLY_RESHARDABLE if reshardable else DP_RESHARDABLE
    with naming_write_errors(tmp / "train" / "optimizer"):
        save_optimizer_state(optimizer, models, tmp / "train" / "optimizer", sharding=sharding)
    rng_file = tmp / "train" / "rng" / f"rank_{ctx.rank:05d}.safetensors"
    with naming_write_errors(rng_file):
        save_file(_rng_tensors(), str(rng_file))
    _barrier(ctx)
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
    _barrier(ctx)
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


def corruption_fix(ckpt_dir: str | Path) -> str:
    """What to do about a corrupt checkpoint: resume from the previous kept step checkpoint
    (named, with the command that selects it), else re-create the folder."""
    ckpt_dir = Path(ckpt_dir)
    root = ckpt_dir.parent
    if not ckpt_dir.name.startswith(STEP_PREFIX):
        return (
            f"re-create {ckpt_dir} (run the conversion or the training round that wrote it "
            "again), or point at an intact copy"
        )
    earlier = sorted(
        (
            p
            for p in root.glob(f"{STEP_PREFIX}*")
            if p.name < ckpt_dir.name and (p / "train" / "state.json").is_file()
        ),
        reverse=True,
    )
    if earlier:
        return (
            f"resume from the previous kept checkpoint {earlier[0]}: run `echo "
            f"{earlier[0].name} > {root / LATEST_FILE}` and `rm -r {ckpt_dir}`, then start "
            "the same command again"
        )
    return (
        f"no earlier checkpoint is kept in {root}: remove {ckpt_dir} and {root / LATEST_FILE}"
        " and start over (or set train.resume=false / another train.output_dir)"
    )


def _verify_small_files(ckpt_dir: Path) -> None:
    """The JSON and HF files of a checkpoint folder against its checksums (each process)."""
    fix = corruption_fix(ckpt_dir)
    entries = read_checksums(ckpt_dir, fix=fix)
    if entries is not None:
        verify_checksums(
            ckpt_dir, [n for n in sorted(entries) if not n.startswith("model/")], fix=fix
        )
