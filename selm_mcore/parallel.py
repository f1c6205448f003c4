"""torch.distributed + Megatron model-parallel set-up, returned as a small ``ParallelContext``.

    ctx = init_parallel(tp=2, pp=2, vpp=None, seed=1234)   # under torchrun, or 1 process
    ...                                                      # pass ctx to whoever needs groups
    destroy_parallel()

Backends: NCCL on GPU (one device per local rank), gloo on CPU, where the CPU compatibility
layer for megatron-core (``selm_mcore.cpu_compat``) is applied first. Under torchrun the process
group is created from the environment (``init_method="env://"``: a ``tcp://`` URL on another
port hangs under torchrun); a plain single process gets an in-memory store, no port needed.

Megatron still keeps its groups in ``megatron.core.parallel_state`` (its model classes read them
from there); this module initialises that state and hands the groups on explicitly so our own
code never reads the globals.

``run_local_ranks`` starts N local processes with torchrun's environment (a free port, RANK,
WORLD_SIZE, LOCAL_RANK), kills them all on the first failure or a timeout and raises with each
rank's stderr: the converters use it to spread a conversion over tp*pp gloo processes, and the
multi-process tests use it (through ``tests/dist/launch.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class ParallelLayoutError(ValueError):
    """A parallel layout that cannot work (world size, tp/pp/vpp against the model)."""


@dataclass
class ParallelContext:
    """Ranks and process groups of this process; passed explicitly to whoever needs them."""

    rank: int
    world_size: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    device: torch.device
    local_rank: int = 0
    seed: int = 1234

    @property
    def is_first_stage(self) -> bool:
        """This rank holds the embedding (pipeline stage 0)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the final norm and output layer (last pipeline stage)."""
        return self.pp_rank == self.pp - 1

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank: vpp with interleaved pipelining, else 1."""
        return self.vpp or 1


def _init_process_group(backend: str) -> None:
    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        # One process without a launcher: an in-memory store needs no free port.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def init_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None,
                  seed: int = 1234) -> ParallelContext:
    """Initialise torch.distributed (env:// or one process) and Megatron's TP/PP/VPP/DP groups.

    Seeds torch and Megatron's model-parallel RNG tracker with ``seed`` (the tensor-parallel
    state differs per TP rank as in Megatron; weights created with use_cpu_initialization are
    TP-invariant). Raises ParallelLayoutError when the world size is not a multiple of tp*pp.
    """
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel

    for name, value in (("parallel.tp", tp), ("parallel.pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ParallelLayoutError(f"{name}={value!r} must be an integer >= 1")
    if vpp is not None and (vpp < 2 or pp < 2):
        raise ParallelLayoutError(
            f"parallel.vpp={vpp} needs vpp >= 2 and pp >= 2 (pp={pp}); use vpp=None for plain "
            "1F1B")

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from selm_mcore import cpu_compat

        cpu_compat.apply()
        device = torch.device("cpu")
    _init_process_group("nccl" if use_cuda else "gloo")

    world_size = dist.get_world_size()
    if world_size % (tp * pp) != 0:
        raise ParallelLayoutError(
            f"world size {world_size} must be a multiple of parallel.tp*parallel.pp = "
            f"{tp}*{pp} = {tp * pp}; launch tp*pp*dp processes (torchrun --nproc-per-node)")

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    ctx = ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        device=device,
        local_rank=local_rank,
        seed=seed,
    )
    logger.info("parallel: world=%d tp=%d pp=%d vpp=%s dp=%d backend=%s", world_size, tp, pp,
                vpp, ctx.dp, dist.get_backend())
    return ctx


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# --- local multi-process launcher -------------------------------------------------------------


class LaunchError(RuntimeError):
    """A rank of run_local_ranks failed or timed out; the message holds every rank's stderr."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, max_chars: int) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text if len(text) <= max_chars else "...\n" + text[-max_chars:]


def _echo_new(path: Path, offset: int) -> int:
    """Write what was appended to ``path`` since ``offset`` to our stderr; new offset."""
    if not path.exists():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    if data:
        sys.stderr.write(data.decode(errors="replace"))
        sys.stderr.flush()
    return offset + len(data)


def run_local_ranks(argv: Sequence[str], nprocs: int, *, timeout_s: float,
                    env: dict[str, str] | None = None, cwd: str | None = None,
                    tail_chars: int = 6000, echo_rank0: bool = False) -> list[str]:
    """Run ``python <argv>`` as ``nprocs`` local ranks with torchrun's environment.

    Each rank gets MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE and OMP_NUM_THREADS=1 (unless set in ``env``). Waits for all; on the first
    non-zero exit or after ``timeout_s`` seconds it kills every rank and raises LaunchError with
    each rank's exit code and the tail of its stderr. Returns each rank's stdout.
    ``echo_rank0`` copies rank 0's stderr (its log and progress messages) to ours as it comes.
    """
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    base_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    with tempfile.TemporaryDirectory(prefix="selm-ranks-") as log_dir:
        procs, outs, errs = [], [], []
        try:
            for rank in range(nprocs):
                out_path = Path(log_dir) / f"rank{rank}.out"
                err_path = Path(log_dir) / f"rank{rank}.err"
                outs.append(out_path)
                errs.append(err_path)
                rank_env = {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                with open(out_path, "wb") as out, open(err_path, "wb") as err:
                    procs.append(subprocess.Popen([sys.executable, *argv], env=rank_env, cwd=cwd,
                                                  stdout=out, stderr=err,
                                                  start_new_session=True))
            deadline = time.monotonic() + timeout_s
            failed = timed_out = False
            echoed = 0
            while True:
                if echo_rank0:
                    echoed = _echo_new(errs[0], echoed)
                codes = [p.poll() for p in procs]
                if all(c == 0 for c in codes):
                    break
                if any(c not in (None, 0) for c in codes):
                    failed = True
                    time.sleep(1.0)  # let the other ranks write their own error first
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.05)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            for proc in procs:
                proc.wait()
                # A rank killed without cleanup leaves helpers (Megatron's checkpoint writers)
                # behind; each rank leads its own process group, so clear that group.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if echo_rank0 and errs:
                _echo_new(errs[0], echoed)
        if failed or timed_out:
            reason = f"timed out after {timeout_s:.0f} s" if timed_out else "failed"
            parts = [f"{nprocs}-rank run of `python {' '.join(map(str, argv))}` {reason}"]
            for rank, (proc, err_path) in enumerate(zip(procs, errs)):
                parts.append(f"--- rank {rank} exit code {proc.returncode}, stderr:\n"
                             f"{_tail(err_path, tail_chars)}")
            raise LaunchError("\n".join(parts))
        return [p.read_text(errors="replace") for p in outs]
