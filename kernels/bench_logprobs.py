"""Benchmark: label log-probs from vocab-parallel logits, four implementations.

Compares, on bf16 logits [1, N, V/tp]:
  triton    the fused Triton kernel (CUDA only)
  megatron  Megatron-Core's vocab_parallel_cross_entropy, negated, used as a log-prob
  naive     plain torch: gather vocabulary, fp32 log_softmax, gather the label
  chunked   the memory-lean chunked torch path (what the package runs on CPU)
  *_inplace the same with inplace_backward=True (the gradient overwrites the logits)
Per case: forward time, forward+backward time, ns/token, achieved GB/s against the bytes floor
(read the logits once forward; read them again and write the gradient backward) and against
the device's measured copy bandwidth, peak extra memory (above the logits and labels) for
forward and for forward+backward, bytes saved for backward per token (tensors the autograd
graph keeps that did not exist before the call), and the largest log-prob difference from naive.

Each row also gives the floor times (the floor bytes at the measured copy bandwidth) and how
many times the floor each path takes. A method whose package is missing (megatron-core for
``megatron``) is skipped with a warning.

Run:
    python -m selm_mcore.kernels.bench_logprobs                 # CUDA: the full grid
    python -m selm_mcore.kernels.bench_logprobs --tp 2          # two processes (NCCL / gloo)
    python -m selm_mcore.kernels.bench_logprobs --full          # the full grid on CPU (slow)
On CPU only the torch paths run, on a smaller default grid (V = 32,000 and 128,256,
N = 256 and 1,024). A table goes to stdout, a CSV to --csv and, with --json, the rows, the
machine and the copy bandwidth as JSON.

Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the process' peak resident set
(Linux VmHWM, reset through /proc/self/clear_refs before each measurement) with glibc told to
mmap every block above 64 KiB, so freed tensors leave the resident set at once and a later
measurement cannot reuse them unseen.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from selm_mcore.kernels.torch_logprobs import (
    chunked_vocab_parallel_logprobs,
    reference_vocab_parallel_logprobs,
)

logger = logging.getLogger(__name__)

METHODS = ("triton", "triton_inplace", "megatron", "naive", "chunked", "chunked_inplace")
GPU_GRID = dict(vocab=[128256, 32000], tokens=[4096, 8192, 16384])
CPU_GRID = dict(vocab=[32000, 128256], tokens=[256, 1024])
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter id


# ----------------------------------------------------------------------------- memory


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}: peak CPU memory needs Linux")


def _release_freed_cpu_memory() -> None:
    libc = ctypes.CDLL("libc.so.6")
    # A fixed threshold also turns off glibc's dynamic threshold, which would otherwise keep
    # freed blocks up to 32 MiB in the heap where later allocations reuse them unseen.
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)


def peak_extra_memory(fn, device: torch.device):
    """Runs fn(); returns (its result, peak bytes allocated above the memory in use before).

    CUDA: the caching allocator's peak. CPU (Linux): the peak resident set size (VmHWM reset
    via /proc/self/clear_refs) minus the resident set before; glibc is set to return freed
    blocks to the OS. Pages touched for the first time (code, allocator metadata) also count,
    so warm the function up first; anything else the process does concurrently counts too.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    _release_freed_cpu_memory()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    result = fn()
    return result, _status_bytes("VmHWM") - before


def saved_bytes_for_backward(fn, inputs) -> int:
    """Bytes of the tensors fn's autograd graph saves that are not views of ``inputs``."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(saved.values())


# ----------------------------------------------------------------------------- methods


def make_method(name: str, tp_group):
    """Returns fn(logits, labels, loss_mask) -> token log-probs [B, T] for one method."""
    inplace = name.endswith("_inplace")
    if name.startswith("triton"):
        from selm_mcore.kernels.vocab_parallel_logprobs import triton_vocab_parallel_logprobs

        return lambda x, y, m: triton_vocab_parallel_logprobs(
            x, y, m, tp_group=tp_group, inplace_backward=inplace
        )
    if name == "megatron":
        from selm_mcore.mcore.forward import megatron_ce_token_logps

        return megatron_ce_token_logps
    if name == "naive":
        return lambda x, y, m: reference_vocab_parallel_logprobs(x, y, m, tp_group=tp_group)
    if name.startswith("chunked"):
        return lambda x, y, m: chunked_vocab_parallel_logprobs(
            x, y, m, tp_group=tp_group, inplace_backward=inplace
        )
    raise ValueError(f"--methods: unknown method {name!r}, choose from {METHODS}")


def _init_megatron_tp(tp: int, device) -> None:
    """Megatron's cross entropy reads its TP group from parallel_state: set it up."""
    from selm_mcore.mcore.parallel import init_tensor_parallel_groups

    if not dist.is_initialized():  # TP=1 in this process: a one-rank group
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
        )
    init_tensor_parallel_groups(tp)


# ----------------------------------------------------------------------------- timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, repeats: int, barrier) -> float:
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device, nbytes: int = 512 * 2**20) -> float:
    """Device memory bandwidth as measured by a large copy (read + write bytes / time)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, 5, lambda: None)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def describe_machine(device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return (
        f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


# ----------------------------------------------------------------------------- one case


def run_case(method, vocab, tokens, dtype, tp_group, device, repeats, seed=0):
    """Measures one (method, V, N) case on this rank; returns a result row (dict)."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    local_vocab = vocab // tp
    barrier = (lambda: dist.barrier(tp_group)) if tp > 1 else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + tp_rank)
    logits = torch.randn(1, tokens, local_vocab, generator=gen, device=device).to(dtype)
    labels = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    labels = labels.to(device)
    loss_mask = torch.ones(1, tokens, device=device)
    grad_out = torch.ones(1, tokens, device=device)
    fn = make_method(method, tp_group)

    def forward(x):
        return fn(x, labels, loss_mask).float()

    def forward_backward(x):
        out = forward(x)
        (grad,) = torch.autograd.grad(out, x, grad_out)
        return grad

    with torch.no_grad():
        naive_out = reference_vocab_parallel_logprobs(logits, labels, loss_mask, tp_group=tp_group)
        out = forward(logits.clone() if dtype == torch.float32 else logits)
        max_diff = (out - naive_out).abs().max().item()
        del naive_out, out
    # Megatron's forward overwrites fp32 inputs in place, *_inplace backwards overwrite them
    # with the gradient: harmless for timing, and the accuracy check above ran first.
    x = logits.detach().requires_grad_()
    fwd_ms = _time_ms(lambda: forward(x), device, repeats, barrier)
    fwd_bwd_ms = _time_ms(lambda: forward_backward(x), device, repeats, barrier)
    saved = saved_bytes_for_backward(lambda: forward(x), [logits, labels, loss_mask, grad_out])
    barrier()
    fwd_out, fwd_peak = peak_extra_memory(lambda: forward(x), device)
    del fwd_out
    barrier()
    grad, fwd_bwd_peak = peak_extra_memory(lambda: forward_backward(x), device)
    del grad
    logits_bytes = logits.numel() * logits.element_size()
    floor_fwd = logits_bytes + 4 * tokens
    floor_fwd_bwd = 3 * logits_bytes + 4 * tokens
    return dict(
        method=method,
        tp=tp,
        vocab=vocab,
        tokens=tokens,
        dtype=str(dtype).replace("torch.", ""),
        fwd_ms=fwd_ms,
        fwd_bwd_ms=fwd_bwd_ms,
        ns_per_token_fwd_bwd=fwd_bwd_ms * 1e6 / tokens,
        gbs_fwd=floor_fwd / (fwd_ms * 1e-3) / 1e9,
        gbs_fwd_bwd=floor_fwd_bwd / (fwd_bwd_ms * 1e-3) / 1e9,
        peak_extra_fwd_mb=fwd_peak / 2**20,
        peak_extra_fwd_bwd_mb=fwd_bwd_peak / 2**20,
        peak_extra_fwd_bwd_vs_logits=fwd_bwd_peak / logits_bytes,
        saved_bytes_per_token=saved / tokens,
        max_abs_diff_vs_naive=max_diff,
    )


# ----------------------------------------------------------------------------- driver

COLUMNS = [
    ("method", "{}"),
    ("tp", "{}"),
    ("vocab", "{}"),
    ("tokens", "{}"),
    ("fwd_ms", "{:.2f}"),
    ("fwd_bwd_ms", "{:.2f}"),
    ("ns_per_token_fwd_bwd", "{:.0f}"),
    ("x_floor_fwd", "{:.1f}x"),
    ("x_floor_fwd_bwd", "{:.1f}x"),
    ("gbs_fwd", "{:.1f}"),
    ("gbs_fwd_bwd", "{:.1f}"),
    ("pct_bw_fwd_bwd", "{:.0f}%"),
    ("peak_extra_fwd_mb", "{:.1f}"),
    ("peak_extra_fwd_bwd_mb", "{:.1f}"),
    ("peak_extra_fwd_bwd_vs_logits", "{:.2f}x"),
    ("saved_bytes_per_token", "{:.0f}"),
    ("max_abs_diff_vs_naive", "{:.1e}"),
]


def format_table(rows) -> str:
    cells = [[name for name, _ in COLUMNS]]
    cells += [[fmt.format(row[name]) for name, fmt in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _methods_for(device, requested):
    import importlib.util

    methods = list(requested)
    if device.type != "cuda":
        skipped = [m for m in methods if m.startswith("triton")]
        if skipped:
            logger.warning(
                "no CUDA device: skipping %s (the Triton kernel runs only on GPU here)",
                ", ".join(skipped),
            )
        methods = [m for m in methods if not m.startswith("triton")]
    if "megatron" in methods and importlib.util.find_spec("megatron") is None:
        logger.warning("megatron-core is not installed: skipping the megatron method")
        methods.remove("megatron")
    return methods


def run_grid(args, tp_group, device):
    """All cases on this rank; returns the rows (identical on every rank)."""
    methods = _methods_for(device, args.methods)
    if "megatron" in methods:
        _init_megatron_tp(1 if tp_group is None else dist.get_world_size(tp_group), device)
    bandwidth = copy_bandwidth_gbs(device)
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            for method in methods:
                row = run_case(method, vocab, tokens, dtype, tp_group, device, args.repeats)
                row["pct_bw_fwd"] = 100 * row["gbs_fwd"] / bandwidth
                row["pct_bw_fwd_bwd"] = 100 * row["gbs_fwd_bwd"] / bandwidth
                # the floor bytes at the copy bandwidth, and how many floors each path takes
                row["floor_fwd_ms"] = row["fwd_ms"] * row["gbs_fwd"] / bandwidth
                row["floor_fwd_bwd_ms"] = row["fwd_bwd_ms"] * row["gbs_fwd_bwd"] / bandwidth
                row["x_floor_fwd"] = bandwidth / row["gbs_fwd"]
                row["x_floor_fwd_bwd"] = bandwidth / row["gbs_fwd_bwd"]
                row["copy_bw_gbs"] = bandwidth
                rows.append(row)
                logger.info("%s", row)
    return rows, bandwidth


def report(rows, bandwidth, device, args):
    machine = describe_machine(device)
    print(
        f"# label log-probs benchmark: {machine}; dtype {args.dtype}; "
        f"measured copy bandwidth {bandwidth:.1f} GB/s"
    )
    print(format_table(rows))
    if args.json:
        import json

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {"machine": machine, "dtype": args.dtype, "copy_bw_gbs": bandwidth, "rows": rows},
                indent=2,
            )
        )
        tmp.replace(path)
        print(f"# wrote {path}")
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["machine", *rows[0].keys()])
            writer.writeheader()
            for row in rows:
                writer.writerow({"machine": machine, **row})
        print(f"# wrote {path}")


def _tp_worker(rank, args, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.tp)
    )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.tp)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        rows, bandwidth = run_grid(args, dist.group.WORLD, device)
        if rank == 0:
            report(rows, bandwidth, device, args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", help="full vocabulary sizes")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per call (N)")
    parser.add_argument("--full", action="store_true", help="the GPU grid even on CPU")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--csv", default="outputs/bench_logprobs.csv", help="'' to skip")
    parser.add_argument("--json", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    grid = GPU_GRID if cuda or args.full else CPU_GRID
    args.vocab = args.vocab or grid["vocab"]
    args.tokens = args.tokens or grid["tokens"]
    for vocab in args.vocab:
        if vocab % args.tp:
            parser.error(f"--vocab {vocab} must be divisible by --tp {args.tp}")
    if cuda and args.tp > torch.cuda.device_count():
        parser.error(f"--tp {args.tp} needs {args.tp} GPUs, found {torch.cuda.device_count()}")
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.tp == 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        rows, bandwidth = run_grid(args, None, device)
        report(rows, bandwidth, device, args)
    else:
        torch.multiprocessing.spawn(_tp_worker, args=(args, _free_port()), nprocs=args.tp)


if __name__ == "__main__":
    main()
