"""What every benchmark mode shares: worker processes, tables, JSON, medians, the config."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selm_mcore.runtime.errors import UserError
from selm_mcore.runtime.files import write_json_atomic
from selm_mcore.runtime.outputs import open_log

logger = logging.getLogger(__name__)


class BenchError(UserError, RuntimeError):
    """A benchmark that cannot run as asked (bad settings, a failed worker process)."""


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; columns are (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        out.append(
            "  ".join(
                c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    """Write ``obj`` as indented JSON (atomically); no-op without a path."""
    if not path:
        return
    write_json_atomic(path, obj)
    logger.info("wrote %s", path)


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    """``uptime``-style 1/5/15-minute load, recorded with every result (the machine is shared)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def median_summary(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Median over repeats of each numeric key, plus the per-repeat values under ``<key>_all``."""
    summary: dict[str, Any] = {"repeats": len(results)}
    for key in keys:
        values = [r[key] for r in results if r.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
        summary[f"{key}_all"] = values
    return summary


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a worker process: its thread count fixed before torch starts, offline."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def run_worker(
    cmd: Sequence[str], out_json: Path, *, threads: int, timeout_s: float, log_path: Path
) -> dict[str, Any]:
    """Run one benchmark process that writes ``out_json``; its JSON, or raise with its log."""
    out_json.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", " ".join(map(str, cmd)))
    with open_log(log_path, append=False) as log:
        try:
            proc = subprocess.run(
                list(map(str, cmd)),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=thread_env(threads),
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"`{' '.join(map(str, cmd))}` ran longer than {timeout_s:.0f} s "
                f"(log: {log_path}); raise --timeout-s or use fewer steps"
            ) from None
    if proc.returncode != 0 or not out_json.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(
            f"`{' '.join(map(str, cmd))}` exited with status {proc.returncode} "
            f"(log: {log_path}); last output:\n{tail}"
        )
    return json.loads(out_json.read_text())


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def paired_ratio(
    a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str
) -> float | None:
    """Median over repeats of a[r][key] / b[r][key]: repeat r of both sides ran back to back,
    so this ratio is steadier than the ratio of medians when the machine's load drifts."""
    ratios = [x[key] / y[key] for x, y in zip(a, b) if x.get(key) and y.get(key)]
    return statistics.median(ratios) if ratios else None


def load_cfg(args):
    from selm_mcore.config.io import config_from_args

    cfg = config_from_args(args)
    if not cfg.model.hf_dir:
        raise BenchError(
            "model.hf_dir is empty: set it in the config or with "
            "--set model.hf_dir=PATH (an HF Llama folder)"
        )
    return cfg


def config_arg(args) -> list[str]:
    return [args.config] if args.config else []


def workdir_path(args, mode: str) -> Path:
    """The folder a benchmark mode writes into (--workdir, default outputs/bench/MODE)."""
    return Path(args.workdir or Path("outputs") / "bench" / mode).absolute()


def workdir_for(args, mode: str) -> Path:
    path = workdir_path(args, mode)
    path.mkdir(parents=True, exist_ok=True)
    return path
