"""The Megatron checkpoint folder: its format, model saves and loads, ``load_policy``.

This module is the one owner of the folder layout (docs/architecture.md)::

    M/selm_checkpoint.json   format, vocab_size, padded_vocab_size, tp, pp, dtype, ...
                             (its presence marks a complete save)
    M/checksums.json         size and sha256 of every file of model/, hf/ and
                             selm_checkpoint.json (written last; ``selm_mcore.mcore.checksums``)
    M/hf/                    HF config.json, generation_config.json, tokenizer files
    M/model/                 Megatron dist checkpoint (torch_dist), global coordinates: any
                             TP/PP/VPP whose tp divides the heads/groups/padded vocabulary loads it
    M/train/                 step checkpoints only: the optimizer, RNG and training state
                             (``selm_mcore.mcore.step_checkpoints``)

Converter output and a round's final policy are model-only folders (``save_model_atomic``: a
temp folder renamed into place); the trainer's step checkpoints live in
``OUT/checkpoints/step_0000040/`` with ``OUT/checkpoints/latest`` naming the newest complete one
(``selm_mcore.mcore.step_checkpoints``).

Loading never unpickles objects a user did not make: json and safetensors here, Megatron's
dist checkpoints through ``selm_mcore.mcore.safe_load``. Loading checks the files against
their checksums first (shared among the ranks); a missing, truncated or changed file raises
``ChecksumError`` naming it and the previous kept step checkpoint to resume from
(``corruption_fix``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selm_mcore.mcore.checksums import record_checksums, verify_checksums_together
from selm_mcore.mcore.model import build_model, load_hf_config
from selm_mcore.mcore.parallel import ParallelContext
from selm_mcore.mcore.weights import hf_config_of, load_hf_weights, write_hf_config_files
from selm_mcore.runtime.errors import UserError, naming_write_errors
from selm_mcore.runtime.files import (
    read_checksums,
    replace_dir,
    verify_checksums,
)
from selm_mcore.runtime.outputs import new_temp_dir

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "selm-mcore/1"
META_FILE = "selm_checkpoint.json"
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CheckpointError(UserError, ValueError):
    """A Megatron checkpoint folder that is missing, incomplete or does not fit the model."""


class ResumeError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed by this run (different data, batch or schedule)."""


# --- the folder -------------------------------------------------------------------------------


def is_megatron_checkpoint(path: str | Path) -> bool:
    """True for a folder in the Megatron checkpoint format (a model folder, not an HF one)."""
    return (Path(path) / META_FILE).is_file()


def hf_files_dir(model_path: str | Path) -> Path:
    """The folder with config.json and tokenizer files of an HF folder or Megatron checkpoint."""
    path = Path(model_path)
    return path / "hf" if is_megatron_checkpoint(path) else path


def barrier(ctx: ParallelContext) -> None:
    """All ranks meet here (nothing to wait for in a single process)."""
    if ctx.world_size > 1:
        dist.barrier()


def shared_temp_dir(target: Path, ctx: ParallelContext, subdirs: Sequence[str] = ()) -> Path:
    """A fresh temporary folder beside ``target`` (``runtime.outputs.new_temp_dir``: an
    unpredictable name, never a planted link) that every rank writes a save into: rank 0
    removes what an interrupted save of ``target`` left, creates it with ``subdirs`` and sends
    its name to the other ranks."""
    name: list[str | None] = [None]
    if ctx.rank == 0:
        with naming_write_errors(target.parent):
            tmp = new_temp_dir(target, clear_stale=True)
            for subdir in subdirs:
                (tmp / subdir).mkdir(parents=True)
        name[0] = str(tmp)
    if ctx.world_size > 1:
        dist.broadcast_object_list(name, src=0)
    assert name[0] is not None
    return Path(name[0])


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
    recompute: str | bool = False,
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
    recompute: str | bool = False,
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
    """Save a model-only checkpoint folder via a fresh temporary folder renamed into place (a
    failed save removes it: a full disk gets its space back)."""
    out_dir = Path(out_dir).absolute()
    if ctx.rank == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = shared_temp_dir(out_dir, ctx)
    try:
        save_model_checkpoint(models, ctx, tmp, hf_config, tokenizer_dir)
        barrier(ctx)
        if ctx.rank == 0:
            replace_dir(tmp, out_dir)
    except BaseException:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(ctx)
    return out_dir


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
