"""HF <-> Megatron checkpoint conversion: ``selm convert`` and tools/convert_hf/*.py.

    hf_to_mcore(hf_dir, M, tp=2, pp=2)   # spawns tp*pp gloo/NCCL ranks itself (tp*pp=1: here)
    mcore_to_hf(M, out_dir)              # HF folder that transformers and vLLM load

    selm convert hf-to-mcore --hf-dir H --out-dir M --tp T --pp P [--overwrite]
    selm convert mcore-to-hf --mcore-dir M --out-dir H2 [--overwrite]

Inputs are validated in the calling process first (config, layout, shard files); then this
process does the work when it is already one of tp*pp launched ranks, or when tp*pp = 1 and it
was not launched as a rank (no ``RANK``: a one-process group of its own, no second interpreter);
otherwise tp*pp local processes (``selm _worker convert SPEC``, started by
``selm_mcore.runtime.launch.run_local_ranks``) do the work, each reading only its slices. The
streaming and memory rules are in ``selm_mcore.mcore.weights``.

Both directions write into a fresh ``.<name>.<random>.tmp`` folder next to the target
(``checkpoint.shared_temp_dir``: never a planted link; the export with ``checksums.json``) and
rename it into place when complete, so a reader never sees a partial or mixed folder. A
non-empty target is refused (stale shards or index files would be loaded with the new ones)
unless ``overwrite`` is given; then the old folder is swapped out in one step and deleted.
``selm convert`` holds the target's lock while it runs (``runtime.outputs.output_locks``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from selm_mcore.mcore.checkpoint import (
    DTYPES,
    build_model_from_checkpoint,
    read_checkpoint_meta,
    save_model_atomic,
    shared_temp_dir,
)
from selm_mcore.mcore.model import build_model, load_hf_config, validate_hf_config, validate_layout
from selm_mcore.mcore.parallel import ParallelContext, destroy_parallel, init_parallel
from selm_mcore.mcore.weights import check_hf_folder, export_hf, load_hf_weights
from selm_mcore.runtime.errors import UserError
from selm_mcore.runtime.files import replace_dir
from selm_mcore.runtime.launch import run_local_ranks
from selm_mcore.runtime.outputs import output_locks, temp_folder
from selm_mcore.runtime.preflight import check_model_run, check_output_dir, model_bytes, num_params
from selm_mcore.runtime.weight_files import DEFAULT_MAX_SHARD_BYTES, SafetensorsReader

logger = logging.getLogger(__name__)


def _log_peak_rss(ctx: ParallelContext, job: str) -> None:
    """Rank 0 logs every rank's peak resident memory (MB) so far."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = [None] * ctx.world_size
    dist.all_gather_object(peaks, round(peak_mb))
    if ctx.rank == 0:
        logger.info("%s: peak RSS per rank %s MB", job, " ".join(str(p) for p in peaks))


def _checkpoint_dtype(hf_config, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    source = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None))
    return torch.bfloat16 if "bfloat16" in source else torch.float32


def _hf_to_mcore_rank(hf_dir: str, out_dir: str, tp: int, pp: int, dtype: str) -> None:
    ctx = init_parallel(tp=tp, pp=pp)
    try:
        hf_config = load_hf_config(hf_dir)
        models = build_model(
            hf_config, ctx, params_dtype=_checkpoint_dtype(hf_config, dtype), init_weights=False
        )
        load_hf_weights(models, hf_dir, ctx)
        save_model_atomic(models, ctx, out_dir, hf_config=hf_config, tokenizer_dir=hf_dir)
        _log_peak_rss(ctx, "hf_to_mcore")
    finally:
        destroy_parallel()


def _mcore_to_hf_rank(mcore_dir: str, out_dir: str, tp: int, pp: int, max_shard_bytes: int) -> None:
    ctx = init_parallel(tp=tp, pp=pp)
    try:
        models, _, _ = build_model_from_checkpoint(mcore_dir, ctx)
        # Rank 0 writes the folder beside the target and swaps it in when it is complete.
        tmp = shared_temp_dir(Path(out_dir).absolute(), ctx)
        try:
            export_hf(
                models, ctx, tmp, aux_dir=Path(mcore_dir) / "hf", max_shard_bytes=max_shard_bytes
            )
            if ctx.rank == 0:
                replace_dir(tmp, out_dir)
        except BaseException:
            if ctx.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log_peak_rss(ctx, "mcore_to_hf")
    finally:
        destroy_parallel()


CONVERT_JOBS = ("hf-to-mcore", "mcore-to-hf")


@dataclass(frozen=True)
class ConvertJob:
    """One conversion rank's work: the child spec of ``selm _worker convert SPEC``, written as
    JSON by the launching process and read back by every rank."""

    job: Literal["hf-to-mcore", "mcore-to-hf"]
    source: str  # the HF folder (hf-to-mcore) or the Megatron checkpoint (mcore-to-hf)
    out_dir: str
    tp: int
    pp: int
    dtype: str = "auto"  # hf-to-mcore: auto, fp32 or bf16
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES  # mcore-to-hf

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ConvertJob:
        if spec.get("job") not in CONVERT_JOBS:
            raise ValueError(f"unknown conversion job {spec.get('job')!r} (one of {CONVERT_JOBS})")
        return cls(**spec)

    @classmethod
    def from_json(cls, text: str) -> ConvertJob:
        return cls.from_dict(json.loads(text))

    def run(self) -> None:
        """This rank's part of the job (every rank of the tp*pp launch calls this)."""
        if self.job == "hf-to-mcore":
            _hf_to_mcore_rank(self.source, self.out_dir, self.tp, self.pp, self.dtype)
        else:
            _mcore_to_hf_rank(self.source, self.out_dir, self.tp, self.pp, self.max_shard_bytes)


def _in_matching_launch(nprocs: int) -> bool:
    if dist.is_initialized():
        if dist.get_world_size() != nprocs:
            raise RuntimeError(
                f"this process group has {dist.get_world_size()} ranks, the "
                f"conversion needs tp*pp={nprocs}"
            )
        return True
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == nprocs


def _run(job: ConvertJob, timeout_s: float) -> None:
    """Run ``job`` in this process when it is one of the job's launched ranks, or when the job
    needs one rank and this process is no launched rank (``init_parallel`` then makes a
    one-process group; ``timeout_s`` applies to launched ranks only); else on tp*pp local
    ranks."""
    nprocs = job.tp * job.pp
    if _in_matching_launch(nprocs) or (nprocs == 1 and "RANK" not in os.environ):
        job.run()
    else:
        _launch(job, timeout_s)


def _launch(job: ConvertJob, timeout_s: float) -> None:
    """Run ``job`` on its tp*pp local ranks (``selm _worker convert SPEC``)."""
    with temp_folder("selm-convert-") as tmp:
        spec_path = tmp / "spec.json"
        spec_path.write_text(job.to_json())
        run_local_ranks(
            ["-P", "-m", "selm_mcore.cli", "_worker", "convert", str(spec_path)],
            job.tp * job.pp,
            timeout_s=timeout_s,
            echo_rank0=True,
        )


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    *,
    dtype: str = "auto",
    timeout_s: float = 3600.0,
    overwrite: bool = False,
) -> None:
    """Convert an HF folder (a supported family: ``selm_mcore.mcore.families``) into a
    selm-mcore checkpoint, sharded over tp*pp ranks.

    ``dtype``: auto (the HF dtype: bf16 stays bf16, else fp32), fp32 or bf16. The checkpoint
    is written beside ``out_dir`` and renamed into place when complete; a non-empty
    ``out_dir`` is refused unless ``overwrite``.
    """
    check_export_target(out_dir, overwrite)
    _preflight(hf_dir, tp, pp, "fp32" if dtype == "fp32" else "bf16")  # auto: at least bf16
    hf_config = load_hf_config(hf_dir)
    validate_hf_config(hf_config)
    validate_layout(hf_config, tp, pp)
    # Missing shard files, left-over or mis-typed tensors fail here, before any process starts.
    check_hf_folder(SafetensorsReader(hf_dir), hf_config)
    bytes_per_param = _checkpoint_dtype(hf_config, dtype).itemsize
    check_output_dir(
        Path(out_dir).absolute().parent,
        what="--out-dir",
        needed_bytes=num_params(hf_dir) * bytes_per_param,
    )
    job = ConvertJob("hf-to-mcore", str(hf_dir), str(out_dir), tp, pp, dtype=dtype)
    _run(job, timeout_s)
    logger.info("converted %s -> %s (tp=%d pp=%d)", hf_dir, out_dir, tp, pp)


def _preflight(config_dir: str | os.PathLike, tp: int, pp: int, dtype: str) -> None:
    """The model's config.json and the memory of its tp*pp local ranks
    (``selm_mcore.runtime.preflight.check_model_run``), before any process starts."""
    from selm_mcore.config.schema import SelmConfig

    cfg = SelmConfig()
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    check_model_run(
        cfg,
        config_dir,
        job="convert",
        dtype=dtype,
        processes_on_host=tp * pp,
    )


class ExportTargetError(UserError, FileExistsError):
    """An export target that holds files and may not be replaced."""


def check_export_target(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a link, a file, or a non-empty folder unless ``overwrite``, as the target."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise ExportTargetError(
            f"--out-dir {out_dir} is a symbolic link (to {os.readlink(out_dir)}); the finished "
            "folder is renamed into place, which would replace the link, not fill the folder it "
            "names: pass that folder instead"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportTargetError(f"--out-dir {out_dir} is a file, not a folder; choose a folder")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not overwrite:
        raise ExportTargetError(
            f"--out-dir {out_dir} is not empty ({len(entries)} entries: "
            f"{', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}); stale weight or "
            "index files there would be loaded with the new ones. Pass --overwrite to replace "
            "the folder, or export into an empty or new folder"
        )


def mcore_to_hf(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tp: int = 1,
    pp: int = 1,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    timeout_s: float = 3600.0,
    overwrite: bool = False,
) -> None:
    """Export a selm-mcore checkpoint (saved at any tp/pp) to an HF folder.

    One process by default (tp=pp=1); larger tp/pp spread the model over more local processes.
    Writes config.json, model.safetensors (sharded above ``max_shard_bytes``, with an index),
    the tokenizer files, generation_config.json and checksums.json; vocabulary padding is
    stripped. A non-empty ``out_dir`` is refused unless ``overwrite`` (see the module doc).
    """
    meta = read_checkpoint_meta(mcore_dir)
    _preflight(Path(mcore_dir) / "hf", tp, pp, meta.get("dtype", "fp32"))
    validate_layout(
        load_hf_config(Path(mcore_dir) / "hf"), tp, pp, padded_vocab=meta["padded_vocab_size"]
    )
    out_dir = Path(out_dir)
    check_export_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_output_dir(
        out_dir.absolute().parent,
        what="--out-dir",
        needed_bytes=model_bytes(Path(mcore_dir) / "hf", meta.get("dtype", "fp32")),
    )
    job = ConvertJob(
        "mcore-to-hf", str(mcore_dir), str(out_dir), tp, pp, max_shard_bytes=max_shard_bytes
    )
    _run(job, timeout_s)
    logger.info("exported %s -> %s", mcore_dir, out_dir)


def worker_main(spec: dict[str, Any]) -> int:
    """One conversion rank (``selm _worker convert SPEC``: ``spec`` is the file's JSON object,
    a ``ConvertJob``)."""
    ConvertJob.from_dict(spec).run()
    return 0


# --- command line (``selm convert`` and tools/convert_hf/*.py) ---------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``selm convert hf-to-mcore|mcore-to-hf`` arguments."""
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF folder -> Megatron checkpoint")
    add_hf_to_mcore_arguments(to_mcore)
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF folder")
    add_mcore_to_hf_arguments(to_hf)


def add_hf_to_mcore_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="HF model folder (safetensors)")
    parser.add_argument("--out-dir", required=True, help="checkpoint folder to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out-dir (swapped in once the checkpoint is done)",
    )


def add_mcore_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mcore-dir", required=True, help="selm-mcore checkpoint folder")
    parser.add_argument("--out-dir", required=True, help="HF folder to write")
    parser.add_argument("--tp", type=int, default=1, help="ranks to spread the export over")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out-dir (swapped in once the export is done)",
    )


def main(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments (``selm convert`` and the tools/ CLIs)."""
    with output_locks({args.out_dir: "--out-dir"}, command=f"selm convert {args.direction}"):
        _convert(args)
    return 0


def _convert(args: argparse.Namespace) -> None:
    if args.direction == "hf-to-mcore":
        hf_to_mcore(
            args.hf_dir,
            args.out_dir,
            args.tp,
            args.pp,
            dtype=args.dtype,
            timeout_s=args.timeout_s,
            overwrite=args.overwrite,
        )
    else:
        mcore_to_hf(
            args.mcore_dir,
            args.out_dir,
            tp=args.tp,
            pp=args.pp,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            timeout_s=args.timeout_s,
            overwrite=args.overwrite,
        )
