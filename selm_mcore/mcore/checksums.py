"""Checksums of folders that several ranks write and read together (Megatron checkpoints).

    record_checksums(folder, ctx, under=("model", "hf", "selm_checkpoint.json"))   # at save
    verify_checksums_together(folder, ctx, fix=..., under=("model",))              # at load

Saving: each rank hashes the files it wrote itself right after writing them (Megatron's
``__<rank>_<n>.distcp`` shards, our ``rank_<rank>.safetensors`` RNG files), so the work is
spread like the writes and reads what is still in the page cache; rank 0 hashes the rest (the
dist checkpoint's metadata, JSON files) and writes ``folder/checksums.json``
(``selm_mcore.runtime.files``) last. Every rank must call it.

Loading: the listed files are dealt out to the ranks (largest first, round robin); each checks
its share and every rank raises the same ``ChecksumError`` (the first bad file of the lowest
rank) when any share is bad. A folder without a checksum list (a checkpoint saved by an older
version, an HF folder from elsewhere) is loaded unchecked.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch.distributed as dist

from selm_mcore.runtime.files import (
    CHECKSUM_FILE,
    ChecksumError,
    checksum_files,
    list_files,
    read_checksums,
    verify_checksums,
    write_checksums,
)

logger = logging.getLogger(__name__)

_OWNER = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank_(\d+)\.safetensors)$")


def file_owner(name: str) -> int:
    """The rank that wrote ``name`` (by Megatron's / our per-rank file names); 0 otherwise."""
    match = _OWNER.match(name.rsplit("/", 1)[-1])
    return int(match.group(1) or match.group(2)) if match else 0


def _gather(ctx, value):
    if ctx.world_size == 1:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def record_checksums(folder: str | os.PathLike, ctx, under: Iterable[str] = ("",)) -> None:
    """Write ``folder/checksums.json`` for the files below ``folder/<under>`` (every rank calls
    this once its own files are written; rank 0 writes the list)."""
    folder, under = Path(folder), tuple(under)
    mine = [name for name in list_files(folder, under) if file_owner(name) == ctx.rank]
    entries = {}
    for part in _gather(ctx, checksum_files(folder, mine)):
        entries.update(part)
    if ctx.rank == 0:
        rest = [name for name in list_files(folder, under) if name not in entries]
        entries.update(checksum_files(folder, rest))
        write_checksums(folder, entries)


def _selected(name: str, under: tuple[str, ...]) -> bool:
    return any(
        not part or name == part or name.startswith(part.rstrip("/") + "/") for part in under
    )


def verify_checksums_together(
    folder: str | os.PathLike, ctx, *, fix: str, under: Iterable[str] = ("",), expected: bool = True
) -> None:
    """Check the listed files below ``folder/<under>``, shared among the ranks (every rank calls
    this); raises the same ``ChecksumError`` on every rank when a file is bad. ``expected``:
    warn when the folder has no list (False for HF folders, which come from anywhere)."""
    folder, under = Path(folder), tuple(under)
    entries = read_checksums(folder, fix=fix)
    if entries is None:
        if expected and ctx.rank == 0:
            logger.warning(
                "%s has no %s (saved by an older version): loaded unchecked", folder, CHECKSUM_FILE
            )
        return
    names = sorted(
        (n for n in entries if _selected(n, under)), key=lambda n: (-entries[n]["size"], n)
    )
    problem = None
    try:
        verify_checksums(folder, names[ctx.rank :: ctx.world_size], fix=fix)
    except ChecksumError as exc:
        problem = (exc.path, exc.problem)
    problems = [p for p in _gather(ctx, problem) if p is not None]
    if problems:
        raise ChecksumError(problems[0][0], problems[0][1], fix)
