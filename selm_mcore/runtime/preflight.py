"""Pre-flight checks of output folders: writable, with room, before a phase computes anything.

    check_output_dir(cfg.train.output_dir, needed_bytes=model_bytes(hf_dir),
                     what="train.output_dir")

A phase that fails to write its result after hours of compute (a read-only mount, a folder
path that is a file, a full disk) loses that work. Each command checks its output folders
first: the folder is created, a temporary file is created and removed in it, and where an
estimate is cheap (model weights from config.json, optimizer state, a reference cache) the free
space must cover it. The estimate is a lower bound of what the phase writes next (one save),
not of everything a run will write.

Sizes: weights = parameters x bytes per parameter (fp32 4, bf16 2); a step checkpoint adds the
optimizer's fp32 Adam moments (8 bytes per parameter) and, for bf16 weights, the fp32 main copy
(4 more).
"""

from __future__ import annotations

import os
from pathlib import Path

from selm_mcore.modelspec import ModelShape
from selm_mcore.runtime.errors import DiskFullError, InputError, free_bytes
from selm_mcore.runtime.outputs import new_temp_file

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}


def check_output_dir(
    folder: str | os.PathLike, *, needed_bytes: int | None = None, what: str = "the output"
) -> Path:
    """Create ``folder`` if needed and prove it writable (a temporary file is created and
    removed); with ``needed_bytes``, its filesystem must have that much free space. Raises
    ``InputError`` / ``DiskFullError`` naming the folder and ``what`` (the setting that chose
    it, e.g. ``train.output_dir``); returns it."""
    folder = Path(folder)
    fix = f"point {what} somewhere you can write"
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what}: {folder} is a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = new_temp_file(folder / "selm-write-check", "probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"{what}: cannot write into {folder} ({exc.strerror or exc}); {fix}"
        ) from None
    if needed_bytes:
        free = free_bytes(folder)
        if free is not None and free < needed_bytes:
            raise DiskFullError(
                folder, needed_bytes, free, headline=f"not enough free space in {folder} ({what})"
            )
    return folder


def num_params(config_dir: str | os.PathLike) -> int:
    """Parameters of the model whose config.json is in ``config_dir``
    (``selm_mcore.modelspec.ModelShape.num_params``)."""
    return ModelShape.from_dir(config_dir).num_params()


def model_bytes(config_dir: str | os.PathLike, dtype: str = "fp32") -> int:
    """Bytes of the model's weights at ``dtype`` (fp32 or bf16)."""
    return num_params(config_dir) * BYTES_PER_PARAM[dtype]


def step_checkpoint_bytes(config_dir: str | os.PathLike, dtype: str = "fp32") -> int:
    """Bytes of one step checkpoint: the weights plus the optimizer state."""
    optimizer_per_param = 8 + (4 if dtype != "fp32" else 0)
    return num_params(config_dir) * (BYTES_PER_PARAM[dtype] + optimizer_per_param)
