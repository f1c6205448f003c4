"""Pre-flight checks before a command computes anything: the model's config and the memory the
run needs (``check_model_run``), and the output folders (writable, with room).

    shape = check_model_run(cfg, config_dir, job="train")

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

The model and the run (``check_model_run``, called first by every command that builds a model
or batches: ``selm refpass``, ``train``, ``generate``, ``convert``, ``bench train``; ``selm
run`` checks the config and the lengths before any phase, each phase its memory), before a
process group, a model or a batch exists:

* the config.json describes a model (``selm_mcore.modelspec``: dimensions >= 1, heads a
  multiple of the key/value heads, ...) and ``model.make_vocab_size_divisible_by`` >= 1;
* the sequences fit the model's context (``max_position_embeddings``): data.max_length for
  the Megatron jobs, generation.max_model_len for generation;
* memory: a lower bound of what one process holds (``memory_needed``: the weights of its share
  of the model; for training also the fp32 gradients, its share of the Adam state and a frozen
  reference on the fly; the layer inputs of one micro-batch of fixed length, split over TP
  unless sequence parallelism is off) must fit the memory there is (``available_memory``: the
  GPU's memory, else the host's available memory over the processes of the job on this
  host). A bound, not an estimate: what passes may still not fit (``selm plan`` estimates the
  whole), but a config.json of 10^7 layers or a data.max_length far past the context stops
  here with one line, not after gigabytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from selm_mcore.modelspec import ModelShape
from selm_mcore.runtime.errors import DiskFullError, InputError, UserError, format_bytes, free_bytes
from selm_mcore.runtime.outputs import new_temp_file

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}
Job = Literal["train", "refpass", "generate", "convert"]


class RunTooLargeError(UserError, MemoryError):
    """A run that cannot fit: sequences past the model's context, or more memory than there is."""


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


# --- the model and the run ------------------------------------------------------------------


def check_context(shape: ModelShape, length: int, key: str, source: str) -> None:
    """``length`` (set by ``key``) within the model's context (max_position_embeddings)."""
    if shape.max_positions is not None and length > shape.max_positions:
        raise RunTooLargeError(
            f"{key}={length} is longer than the model's context: {source} has "
            f"max_position_embeddings={shape.max_positions}. Fix: set {key} <= "
            f"{shape.max_positions}"
        )


def _host_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo, less where a cgroup (v2) limit leaves less."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def available_memory(processes_on_host: int) -> tuple[int | None, str]:
    """(bytes one process may use, where): the GPU's memory when CUDA is visible (asked of
    torch when the command has imported it), else the host's available memory shared by
    ``processes_on_host`` processes."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1], f"the memory of one {torch.cuda.get_device_name()}"
    host = _host_memory_bytes()
    if host is None:
        return None, "unknown"
    share = f" shared by {processes_on_host} processes" if processes_on_host > 1 else ""
    return host // max(processes_on_host, 1), f"host memory available{share}"


def memory_needed(shape: ModelShape, cfg: Any, job: Job, dtype: str) -> dict[str, int]:
    """Lower bound of the bytes one process of ``job`` holds (module docstring), by part."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if job == "generate":
        tp, pp = cfg.generation.tensor_parallel_size, 1
    share = shape.num_params() / (tp * pp)
    width = BYTES_PER_PARAM[dtype]
    parts = {"weights": int(share * width)}
    if job == "train":
        world = (
            int(os.environ.get("WORLD_SIZE", "0")) or cfg.online.nproc_per_node * cfg.online.nnodes
        )
        dp = max(1, world // (tp * pp))
        parts["gradients"] = int(share * 4)
        parts["optimizer state"] = int(share * (8 + (4 if width < 4 else 0)) / dp)
        if cfg.train.reference_mode == "onthefly":
            parts["reference"] = parts["weights"]
    if job in ("train", "refpass"):
        data = cfg.data
        tokens = data.seq_length() or 0  # a fixed micro-batch length: known now
        if data.packing != "none":
            tokens = data.pack_tokens
        elif tokens:
            tokens *= cfg.train.micro_batch_size * 2  # chosen and rejected at least
        layers = shape.num_layers // pp if job == "train" else 1
        # Sequence parallelism (on unless parallel.sequence_parallel=false, when tp > 1) keeps
        # 1/tp of each layer input per process: the bound assumes it may be on.
        split = tp if cfg.parallel.sequence_parallel != "false" else 1
        parts["activations"] = tokens * shape.hidden_size * width * layers // split
    return parts


def check_memory(shape: ModelShape, cfg: Any, job: Job, dtype: str, processes_on_host: int) -> None:
    """Refuse a run whose lower bound of memory (``memory_needed``) exceeds what there is."""
    parts = memory_needed(shape, cfg, job, dtype)
    needed = sum(parts.values())
    available, where = available_memory(processes_on_host)
    if available is None or needed <= available:
        return
    detail = ", ".join(f"{name} {format_bytes(n)}" for name, n in parts.items() if n)
    raise RunTooLargeError(
        f"the model ({shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.num_params():.3g} parameters) needs at least {format_bytes(needed)} per "
        f"process ({detail}) but {format_bytes(available)} is {where}. Fix: check its "
        "config.json; or spread it over more GPUs (parallel.tp / parallel.pp, "
        "generation.tensor_parallel_size), use bf16 (model.dtype) or shorter micro-batches "
        "(data.max_length, data.pack_tokens)"
    )


def check_model_run(
    cfg: Any,
    config_dir: str | os.PathLike,
    *,
    job: Job,
    dtype: str | None = None,
    processes_on_host: int | None = None,
    memory: bool = True,
) -> ModelShape:
    """The pre-flight of a command that builds a model or batches (module docstring): the
    model's config.json, the lengths against its context and (``memory``) the memory; returns
    its shape. ``dtype``: the weights' dtype (fp32 / bf16; default model.dtype);
    ``processes_on_host``: the job's processes on this host (default LOCAL_WORLD_SIZE, else
    1)."""
    shape = ModelShape.from_dir(
        config_dir, vocab_divisible_by=cfg.model.make_vocab_size_divisible_by
    )
    source = str(Path(config_dir) / "config.json")
    if job in ("train", "refpass"):
        check_context(shape, cfg.data.max_length, "data.max_length", source)
    if job == "generate":
        check_context(shape, cfg.generation.max_model_len, "generation.max_model_len", source)
    if memory:
        processes = processes_on_host or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        check_memory(shape, cfg, job, dtype or cfg.model.dtype, processes)
    return shape
