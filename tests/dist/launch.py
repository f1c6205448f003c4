"""Shared launcher for multi-process (gloo) tests: N local ranks, a timeout, readable failures.

In a test (tests/dist/conftest.py puts this folder on sys.path; a worker script run by path
has it there from Python itself)::

    from launch import run_distributed, results
    outs = run_distributed(Path(__file__).resolve(), nprocs=4, args=["--worker", tmp_path],
                           timeout_s=180)
    per_rank = results(outs)          # what each rank passed to emit(), as JSON values

In a worker script (run as ``python tests/dist/my_worker.py ARGS`` on every rank; the script's
folder is on sys.path, the repository root is not)::

    from launch import emit
    from selm_mcore.mcore.parallel import init_parallel, destroy_parallel

    def main():
        ctx = init_parallel(tp=2, pp=2)        # env:// from the variables set below
        ...
        emit({"rank": ctx.rank, "max_abs_diff": diff})
        destroy_parallel()

    if __name__ == "__main__":               # required: Megatron checkpoint saves hang without
        main()

Each rank gets torchrun's environment (MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), OMP_NUM_THREADS=1, the offline HF variables and
``CUDA_VISIBLE_DEVICES=""``: the multi-process tests run the CPU/gloo path even on a CUDA machine
(with CUDA, every rank would take NCCL and ``cuda:LOCAL_RANK``, and 2-4 ranks fail on a box with
fewer GPUs). A GPU test passes ``cuda=True`` to keep the devices visible. The
first rank that exits non-zero, or the timeout, kills all ranks; the LaunchError raised then
holds every rank's exit code and the tail of its stderr. Keep worker runs lean (the CI machine
has 2 cores): group several checks into one launch instead of one launch per check.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from selm_mcore.runtime.launch import LaunchError, run_local_ranks
from selm_mcore.runtime.procs import freeze_heap_at_exit

__all__ = [
    "run_distributed",
    "rank_environment",
    "emit",
    "results",
    "LaunchError",
    "REPO_ROOT",
    "DIST_DIR",
]

DIST_DIR = Path(__file__).resolve().parent
REPO_ROOT = DIST_DIR.parents[1]
# Worker scripts import the shared test helpers of tests/support by name (e.g. ``payloads``).
if str(DIST_DIR.parent / "support") not in sys.path:
    sys.path.insert(0, str(DIST_DIR.parent / "support"))
_MARK = "@@selm-result@@ "
# Every rank imports this module: its exit is as short as a selm command's.
freeze_heap_at_exit()

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
HIDE_CUDA = {"CUDA_VISIBLE_DEVICES": ""}


def rank_environment(env: dict[str, str] | None = None, *, cuda: bool = False) -> dict[str, str]:
    """What ``run_distributed`` adds to every rank's environment (CUDA hidden unless ``cuda``)."""
    return {**OFFLINE_ENV, **({} if cuda else HIDE_CUDA), **(env or {})}


def run_distributed(
    script: str | os.PathLike,
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    module: bool = False,
    cuda: bool = False,
) -> list[str]:
    """Run ``python script *args`` (or ``python -m script`` with module=True) as nprocs ranks,
    on the CPU/gloo path unless ``cuda`` (GPU tests).

    Returns each rank's stdout (index = rank). Raises LaunchError (with all ranks' stderr) if a
    rank fails or the run exceeds ``timeout_s``.
    """
    argv = (["-m", str(script)] if module else [str(script)]) + [str(a) for a in args]
    return run_local_ranks(
        argv, nprocs, timeout_s=timeout_s, env=rank_environment(env, cuda=cuda), cwd=str(REPO_ROOT)
    )


def emit(value: Any) -> None:
    """From a worker: report a JSON-serialisable value to the test (read with ``results``)."""
    print(_MARK + json.dumps(value), flush=True)


def results(stdouts: Iterable[str]) -> list[list[Any]]:
    """Per rank, the values it emitted, in order."""
    return [
        [json.loads(line[len(_MARK) :]) for line in out.splitlines() if line.startswith(_MARK)]
        for out in stdouts
    ]
