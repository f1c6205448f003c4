"""Local multi-process launches: N ranks with torchrun's environment, killed together.

    run_local_ranks(["-m", "selm_mcore.cli", "_worker", "convert", SPEC], nprocs=4,
                    timeout_s=600)

``run_local_ranks`` starts N local processes with torchrun's environment (a free port, RANK,
WORLD_SIZE, LOCAL_RANK), kills them all on the first failure or a timeout and raises with each
rank's stderr: the converters use it to spread a conversion over tp*pp gloo processes, and the
multi-process tests use it (through ``tests/dist/launch.py``). No torch import: a launcher
should start in milliseconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from selm_mcore.runtime.procs import child_env, die_with_parent_preexec


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


def _first_reported_error(err_paths: Sequence[Path]) -> str | None:
    """The first one-line user error a rank printed (``selm ...: error: MESSAGE``)."""
    for path in err_paths:
        for line in (path.read_text(errors="replace") if path.exists() else "").splitlines():
            if ": error: " in line and line.lstrip().startswith("selm"):
                return line.split(": error: ", 1)[1]
    return None


def run_local_ranks(
    argv: Sequence[str],
    nprocs: int,
    *,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    tail_chars: int = 6000,
    echo_rank0: bool = False,
) -> list[str]:
    """Run ``python <argv>`` as ``nprocs`` local ranks with torchrun's environment.

    Each rank gets MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE and OMP_NUM_THREADS=1 (unless set in ``env``). Waits for all; on the first
    non-zero exit or after ``timeout_s`` seconds it kills every rank and raises LaunchError with
    each rank's exit code and the tail of its stderr. Returns each rank's stdout.
    ``echo_rank0`` copies rank 0's stderr (its log and progress messages) to ours as it comes.
    """
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    base_env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
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
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, *argv],
                            env=child_env(rank_env),
                            cwd=cwd,
                            stdout=out,
                            stderr=err,
                            start_new_session=True,
                            preexec_fn=die_with_parent_preexec(),
                        )
                    )
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
            reported = _first_reported_error(errs)
            parts = [
                f"{nprocs}-rank run of `python {' '.join(map(str, argv))}` {reason}"
                + (f": {reported}" if reported else "")
            ]
            for rank, (proc, err_path) in enumerate(zip(procs, errs)):
                parts.append(
                    f"--- rank {rank} exit code {proc.returncode}, stderr:\n"
                    f"{_tail(err_path, tail_chars)}"
                )
            raise LaunchError("\n".join(parts))
        return [p.read_text(errors="replace") for p in outs]
