"""The environment of a ``selm`` command a test starts: offline, one thread, no fault injection;
and such a command run with its memory capped (``run_selm_limited``).

Importable as ``child_env`` from tests (tests/conftest.py).
"""

import os
import resource
import subprocess
import sys

INJECTION_VARIABLES = ("SELM_FAULT", "SELM_TRAIN_KILL_AFTER_STEP", "SELM_DIE_WITH_PARENT")


def child_env() -> dict[str, str]:
    """This process's environment without the fault-injection variables, offline, 1 thread."""
    env = {k: v for k, v in os.environ.items() if k not in INJECTION_VARIABLES}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONSAFEPATH="1",
    )
    return env


def run_selm_limited(
    *args: str, memory_bytes: int = 3 << 30, timeout_s: float = 180
) -> subprocess.CompletedProcess:
    """``selm ARGS`` in a child process whose address space is capped at ``memory_bytes``
    (RLIMIT_AS) and whose run is cut at ``timeout_s``: an input that makes a command allocate
    without bound fails the test (MemoryError traceback, a kill or the timeout) instead of
    taking the machine."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return subprocess.run(
        [sys.executable, "-m", "selm_mcore.cli", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        preexec_fn=limit_memory,
    )
