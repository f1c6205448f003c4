"""``selm bench checksums HF_DIR``: what the checksums of saved folders cost, in seconds per GB.

One process (tp = pp = 1) loads the HF model into Megatron, then for a Megatron model checkpoint
(``save_model_checkpoint`` / ``load_model_checkpoint``) and an HF export (``export_hf`` /
``load_policy``) measures, median of ``--repeats``:

    save s    the whole save, checksums included
    hash s    hashing the saved files again (what the save adds: ``record_checksums``)
    load s    the whole load, verification included
    verify s  verifying the files (read + sha256 + compare: what the load adds)

and s/GB for hashing and verifying (folder bytes / time). The files are read right after they
were written, from the page cache, as in a training run; a cold read adds the disk's read time
(the loader then reads them from the cache). The cost per GB holds for step checkpoints too
(their optimizer state is more files of the same kind).
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from selm_mcore.bench.common import format_table, workdir_for
from selm_mcore.runtime.files import CHECKSUM_FILE, list_files, verify_checksums


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _memory_sha256_gbps(num_bytes: int = 256 << 20) -> float:
    data = bytes(num_bytes)
    seconds = _timed(lambda: hashlib.sha256(data).digest())
    return num_bytes / seconds / 1e9


def _folder_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in list_files(folder))


COLUMNS = (
    ("kind", "folder", ""),
    ("GB", "GB", ".3f"),
    ("save_s", "save s", ".2f"),
    ("hash_s", "hash s", ".2f"),
    ("hash_s_per_GB", "hash s/GB", ".2f"),
    ("hash_share_of_save", "of save", ".0%"),
    ("load_s", "load s", ".2f"),
    ("verify_s", "verify s", ".2f"),
    ("verify_s_per_GB", "verify s/GB", ".2f"),
    ("verify_share_of_load", "of load", ".0%"),
)


def _time_kind(
    kind: str,
    save: Callable[[Path], object],
    rehash: Callable[[Path], object],
    load: Callable[[Path], object],
    workdir: Path,
    repeats: int,
) -> dict[str, Any]:
    """One kind of folder: save, hash, load and verify it ``repeats`` times; the medians and
    what the checksums cost per GB and as a share of the save / load."""
    times: dict[str, list[float]] = {"save": [], "hash": [], "load": [], "verify": []}
    for repeat in range(repeats):
        out = workdir / f"{kind.split()[0].lower()}_{repeat}"
        shutil.rmtree(out, ignore_errors=True)
        times["save"].append(_timed(partial(save, out)))
        times["hash"].append(_timed(partial(rehash, out)))
        times["load"].append(_timed(partial(load, out)))
        times["verify"].append(_timed(partial(verify_checksums, out, fix="")))
        if not (out / CHECKSUM_FILE).is_file():
            raise RuntimeError(f"{kind}: the save wrote no {CHECKSUM_FILE}")
        gigabytes = _folder_bytes(out) / 1e9
        shutil.rmtree(out)
    row: dict[str, Any] = {
        "kind": kind,
        "GB": gigabytes,
        **{f"{k}_s": statistics.median(v) for k, v in times.items()},
    }
    row["hash_s_per_GB"] = row["hash_s"] / gigabytes
    row["verify_s_per_GB"] = row["verify_s"] / gigabytes
    row["hash_share_of_save"] = row["hash_s"] / row["save_s"]
    row["verify_share_of_load"] = row["verify_s"] / row["load_s"]
    return row


def run_checksums(args) -> dict[str, Any]:
    import torch.distributed as dist

    from selm_mcore.config.schema import ModelConfig
    from selm_mcore.mcore.checkpoint import (
        load_model_checkpoint,
        load_policy,
        save_model_checkpoint,
    )
    from selm_mcore.mcore.checksums import record_checksums
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.mcore.weights import export_hf
    from selm_mcore.runtime.files import checksum_files

    workdir = workdir_for(args, "checksums")
    ctx = init_parallel(tp=1, pp=1)
    try:
        models, hf_config = load_policy(args.hf_dir, ctx, ModelConfig())
        kinds = {
            "megatron checkpoint": (
                lambda out: save_model_checkpoint(models, ctx, out, hf_config, args.hf_dir),
                lambda out: record_checksums(
                    out, ctx, under=("model", "hf", "selm_checkpoint.json")
                ),
                lambda out: load_model_checkpoint(models, ctx, out),
            ),
            "HF export": (
                lambda out: export_hf(models, ctx, out, aux_dir=args.hf_dir),
                lambda out: checksum_files(out, list_files(out)),
                lambda out: load_policy(out, ctx, ModelConfig()),
            ),
        }
        rows = [_time_kind(kind, *steps, workdir, args.repeats) for kind, steps in kinds.items()]
        if dist.is_initialized():
            dist.barrier()
    finally:
        destroy_parallel()
    memory_gbps = _memory_sha256_gbps()
    print(
        f"checksum cost on {args.hf_dir} (sha256; {memory_gbps:.2f} GB/s over bytes in "
        f"memory; median of {args.repeats}; files in the page cache)"
    )
    print(format_table(rows, COLUMNS))
    return {
        "mode": "checksums",
        "hf_dir": str(args.hf_dir),
        "repeats": args.repeats,
        "sha256_memory_GBps": memory_gbps,
        "rows": rows,
    }
