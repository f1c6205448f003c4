"""``selm bench phases`` (seconds per phase of an online run) and ``selm bench flops``."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from selm_mcore.bench.common import BenchError, format_table, load_cfg
from selm_mcore.modelspec import ModelShape, forward_flops
from selm_mcore.runtime.procs import cuda_available
from selm_mcore.train.metrics import device_peak

PHASE_ORDER = ("portion", "export", "generate", "rank", "refpass", "train", "report")


def phase_times(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Seconds per phase of each round (and ``final``) from ``WORKDIR/manifest.json``.

    The online loop records each finished phase's wall time there (``selm_mcore.loop.online``); a
    phase skipped on resume keeps the time of the run that did it.
    """
    path = Path(workdir) / "manifest.json"
    if not path.is_file():
        raise BenchError(f"{path} not found: pass the online.workdir of a `selm run`")
    phases = json.loads(path.read_text()).get("phases", {})
    rows: dict[str, dict[str, Any]] = {}
    for name, record in phases.items():
        group, _, phase = name.rpartition("/")
        row = rows.setdefault(group or "-", {"round": group or "-"})
        row[phase] = float(record["seconds"])
    for row in rows.values():
        row["total"] = sum(v for k, v in row.items() if k != "round")
    return list(rows.values())


def run_phases_mode(args) -> dict[str, Any]:
    rows = phase_times(args.workdir)
    seen = [p for p in PHASE_ORDER if any(p in r for r in rows)]
    extra = sorted({k for r in rows for k in r} - set(PHASE_ORDER) - {"round", "total"})
    columns = (
        [("round", "round", "")]
        + [(p, f"{p} s", ".1f") for p in seen + extra]
        + [("total", "total s", ".1f")]
    )
    print(f"time per phase of {args.workdir} (from manifest.json)")
    print(format_table(rows, columns))
    return {"mode": "phases", "workdir": str(args.workdir), "rounds": rows}


def run_flops(args) -> dict[str, Any]:
    cfg = load_cfg(args)
    shape = ModelShape.from_dir(cfg.model.hf_dir)
    per_seq = forward_flops(shape, [args.seq_length])
    peak = device_peak("cuda" if cuda_available() else "cpu", args.threads)
    print(f"{cfg.model.hf_dir}: {asdict(shape)}")
    print(f"N (matmul params per token) = {shape.matmul_params():,}")
    print(
        f"forward of one {args.seq_length}-token sequence = {per_seq:.4g} FLOP "
        f"(2*N*s = {2 * shape.matmul_params() * args.seq_length:.4g} + causal attention)"
    )
    print(f"training (policy fwd+bwd) per token = {3 * per_seq / args.seq_length:.4g} FLOP")
    print(f"device peak: {peak['source']}")
    return {
        "mode": "flops",
        "shape": asdict(shape),
        "matmul_params": shape.matmul_params(),
        "forward_flops_per_sequence": per_seq,
        "seq_length": args.seq_length,
        "peak": peak,
    }
