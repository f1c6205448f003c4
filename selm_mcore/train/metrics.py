"""Per-step training metrics (a log line, TensorBoard, JSONL, a progress bar) and MFU.

Only the logging rank (global rank 0) writes; every other rank gets a ``StepMetricsWriter`` with
``enabled=False`` so call sites stay free of rank checks::

    writer = StepMetricsWriter(out_dir, total_steps=100, enabled=ctx.rank == 0, resume_step=40)
    writer.log(41, {"loss": 0.69, "lr": 1e-7, ...})
    writer.close()

With ``wandb_run`` (``selm_mcore.train.wandb_log``) the same metrics go to Weights & Biases.
``out_dir/metrics.jsonl`` holds one JSON object per logged step; on resume, lines of steps after
``resume_step`` (written by the interrupted run after its last checkpoint) are dropped so the file
reads as one continuous run, and so is a line that does not read (torn by a kill), with a
warning; non-finite values are written as NaN / Infinity (never dropped).
TensorBoard needs the ``tensorboard`` package (pip extra ``selm-mcore[logging]``).

Model FLOPs: ``selm_mcore.modelspec`` (``training_flops``, ``packed_forward_flops``).

MFU = policy model FLOP/s per device / device peak. Peaks: NVIDIA H100/H200 989 TFLOP/s dense
bf16 (A100 312); on CPU the fp32 GEMM rate measured on this machine with the same thread count
(``measure_cpu_peak_flops``).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from selm_mcore.runtime.files import DataError, iter_records, write_jsonl_atomic
from selm_mcore.runtime.outputs import is_plain_file, open_log

logger = logging.getLogger(__name__)

# Keys shown in the one-line step summary, in this order, with their format.
_LINE_FIELDS = (
    ("loss", "loss {:.6f}"),
    ("rewards/accuracies", "acc {:.3f}"),
    ("rewards/margins", "margin {:.4g}"),
    ("grad_norm", "gnorm {:.4g}"),
    ("lr", "lr {:.3e}"),
    ("pairs_per_s", "{:.3g} pairs/s"),
    ("tokens_per_s", "{:.0f} tok/s"),
    ("packing_efficiency", "pack {:.2f}"),
    ("step_time_s", "{:.2f} s/step"),
    ("mfu", "MFU {:.3f}"),
    ("memory_gib", "mem {:.2f} GiB"),
)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def _lines_to_keep(path: Path, resume_step: int) -> list[dict]:
    """The records of ``path`` up to ``resume_step``. A line that does not read (a torn last
    line: the run was killed while writing it) is dropped with a warning: this file is written
    here, and its steps after the checkpoint are logged again."""
    kept, unreadable = [], []
    for line, record in iter_records(path):
        if isinstance(record, DataError):
            unreadable.append(line)
            continue
        step = record.get("step", 0)
        if isinstance(step, (int, float)) and step <= resume_step:
            kept.append(record)
    if unreadable:
        logger.warning(
            "%s: dropped %d line(s) that do not read (line %s; a run stopped while writing "
            "them); the steps after step %d are logged again",
            path,
            len(unreadable),
            ", ".join(map(str, unreadable[:5])),
            resume_step,
        )
    return kept


def format_step_line(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    """``step 3/10 | loss 0.693147 | acc 0.500 | ...`` with the fields that are present."""
    parts = [f"step {step}/{total_steps}"]
    for key, fmt in _LINE_FIELDS:
        if key in metrics and metrics[key] is not None:
            parts.append(fmt.format(metrics[key]))
    return " | ".join(parts)


class StepMetricsWriter:
    """Writes each logged step to the log, TensorBoard, JSONL and a progress bar (rank 0 only)."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        total_steps: int,
        enabled: bool,
        tensorboard: bool = False,
        resume_step: int = 0,
        log_interval: int = 1,
        progress_bar: bool = True,
        wandb_run: Any = None,
    ):
        self.total_steps = total_steps
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        # A selm_mcore.train.wandb_log.WandbRun: the same metrics, under the same names.
        self._wandb = wandb_run if enabled else None
        self._tb = None
        self._jsonl = None
        self._bar = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path = out_dir / "metrics.jsonl"
        if is_plain_file(jsonl_path):  # a link there is removed by open_log, never read
            write_jsonl_atomic(jsonl_path, _lines_to_keep(jsonl_path, resume_step))
        self._jsonl = open_log(jsonl_path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "train.tensorboard=true needs the tensorboard package: "
                    "pip install 'selm-mcore[logging]' (or set train.tensorboard=false)"
                ) from exc
            # purge_step drops events of steps after the resumed checkpoint.
            self._tb = SummaryWriter(
                str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=resume_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                file=sys.stderr,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of optimizer step ``step`` (1-based)."""
        if not self.enabled:
            return
        assert self._jsonl is not None, "log() after close()"
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log(step, clean)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{clean.get('loss', float('nan')):.4f}", refresh=False)
        if step % self.log_interval == 0 or step == self.total_steps:
            logger.info(format_step_line(step, self.total_steps, clean))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._tb = self._jsonl = self._wandb = None


# --- MFU: device peaks --------------------------------------------------------------------------


GPU_PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM; the PCIe card is 756 TFLOP/s
    "A100": 312e12,
}


def measure_cpu_peak_flops(threads: int, *, size: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 GEMM rate (FLOP/s) of torch.mm on ``size``^2 matrices with ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)  # leaves the global RNG alone
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)  # warm-up
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)


def device_peak(device: str, threads: int, *, seconds: float = 1.0) -> dict[str, Any]:
    """{"flops": peak FLOP/s, "source": how it was obtained} for "cuda" or "cpu"."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16_FLOPS.items():
            if key in name:
                return {
                    "flops": flops,
                    "source": f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16 (vendor peak)",
                }
        return {"flops": float("nan"), "source": f"{name}: peak unknown, MFU not reported"}
    flops = measure_cpu_peak_flops(threads, seconds=seconds)
    return {
        "flops": flops,
        "source": f"measured fp32 GEMM (torch.mm 1024^3) on {threads} "
        f"thread(s): {flops / 1e9:.1f} GFLOP/s",
    }
