"""Local multi-process launches: N ranks with torchrun's environment, killed together.

    run_local_ranks(["-m", "selm_mcore.cli", "_worker", "convert", SPEC], nprocs=4,
                    timeout_s=600)

``run_local_ranks`` starts N local processes with torchrun's environment (a free port, RANK,
WORLD_SIZE, LOCAL_RANK) through the one child-process supervisor
(``selm_mcore.runtime.procs.ChildProcesses``), which kills them all on the first failure or a
timeout; it raises with each rank's stderr. The converters use it to spread a conversion over
tp*pp gloo processes, and the multi-process tests use it (through ``tests/dist/launch.py``). No
torch import: a launcher should start in milliseconds.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

from selm_mcore.runtime.errors import UserError
from selm_mcore.runtime.outputs import temp_folder
from selm_mcore.runtime.procs import Child, ChildProcesses, Outcome


class LaunchError(UserError, RuntimeError):
    """A rank of run_local_ranks failed or timed out; the message holds every rank's stderr."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_reported_error(ranks: Sequence[Child]) -> str | None:
    """The first one-line user error a rank printed (``selm ...: error: MESSAGE``)."""
    for rank in ranks:
        for line in rank.output().splitlines():
            if ": error: " in line and line.lstrip().startswith("selm"):
                return line.split(": error: ", 1)[1]
    return None


def _failure_report(
    argv: Sequence[str], ranks: Sequence[Child], outcome: Outcome, timeout_s: float, tail_chars: int
) -> str:
    reason = f"timed out after {timeout_s:.0f} s" if outcome.timed_out else "failed"
    reported = _first_reported_error(ranks)
    parts = [
        f"{len(ranks)}-rank run of `python {' '.join(map(str, argv))}` {reason}"
        + (f": {reported}" if reported else "")
    ]
    for rank, child in enumerate(ranks):
        parts.append(
            f"--- rank {rank} exit code {child.returncode}, stderr:\n{child.tail_chars(tail_chars)}"
        )
    return "\n".join(parts)


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
    non-zero exit or after ``timeout_s`` seconds it kills every rank (and what each started)
    and raises LaunchError with each rank's exit code and the tail of its stderr. Returns each
    rank's stdout. ``echo_rank0`` copies rank 0's stderr (its log and progress messages) to ours
    as it comes.
    """
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    base_env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    with temp_folder("selm-ranks-") as logs:
        with ChildProcesses() as children:
            ranks = [
                children.start(
                    [sys.executable, *argv],
                    logs / f"rank{rank}.err",
                    stdout_path=logs / f"rank{rank}.out",
                    env={**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    cwd=cwd,
                    echo_to=sys.stderr if echo_rank0 and rank == 0 else None,
                )
                for rank in range(nprocs)
            ]
            # On a failure, a second for the other ranks to write their own error first.
            outcome = children.wait(timeout_s, settle_s=1.0)
        if not outcome.ok:
            raise LaunchError(_failure_report(argv, ranks, outcome, timeout_s, tail_chars))
        return [(logs / f"rank{rank}.out").read_text(errors="replace") for rank in range(nprocs)]
