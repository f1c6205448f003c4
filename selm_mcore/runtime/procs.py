"""Child processes die with their parent: the parent-death signal on Linux, a watchdog elsewhere.

    subprocess.Popen(cmd, preexec_fn=die_with_parent_preexec(), env=child_env(env))  # launchers
    bind_to_launcher()      # at CLI start-up: a rank that torchrun (or our launcher) started

A process killed with SIGKILL cannot clean up, so without this its children run on as orphans:
torchrun's ranks (each in its own session) keep training, a phase of ``selm run`` keeps
computing, Megatron's checkpoint-writer helpers keep their memory. The kernel can instead send
the child SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``). The request is cleared at
fork (and kept across exec), so every generation makes its own:

* our launchers (``runner.run_command``, ``launch.run_local_ranks``,
  ``generation._run_engines``) make it in the child between fork and exec (``preexec_fn``), so
  it covers any program they start (torchrun, srun, ``selm``);
* a rank started by torchrun, which is not ours, makes it at start-up (``bind_to_launcher`` in
  ``selm_mcore.cli``, when ``TORCHELASTIC_RUN_ID`` or ``SELM_DIE_WITH_PARENT`` is set);
* processes forked by a rank or an engine (``forked_children_die_with_this_process``, a fork
  hook) and Megatron's spawned checkpoint-writer manager: ``selm_mcore.mcore.helper_processes``.

Linux sends the signal when the *thread* that started the child ends: children are started from
the thread that waits for them. Where prctl is missing (macOS), ``bind_to_launcher`` starts a
daemon thread that polls the parent pid every ``WATCHDOG_INTERVAL_S`` and kills the process
when it changes; the launchers then set ``SELM_DIE_WITH_PARENT`` so their children do so.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
DIE_WITH_PARENT_ENV = "SELM_DIE_WITH_PARENT"  # the launcher's pid
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every rank's environment
WATCHDOG_INTERVAL_S = 0.5


def _prctl() -> Callable | None:
    """libc's prctl, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(expected_parent: int, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel for ``sig`` when this process's parent dies; False where unsupported.

    If the parent already died (our parent is no longer ``expected_parent``) the signal would
    never come: this process kills itself at once.
    """
    prctl = _prctl()
    if (
        prctl is None
        or prctl(
            ctypes.c_int(PR_SET_PDEATHSIG),
            ctypes.c_ulong(int(sig)),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        != 0
    ):
        return False
    if os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True


def parent_death_signal() -> int | None:
    """The signal this process gets when its parent dies (0 = none), None where unsupported."""
    prctl = _prctl()
    if prctl is None:
        return None
    value = ctypes.c_int(0)
    if (
        prctl(
            ctypes.c_int(PR_GET_PDEATHSIG),
            ctypes.byref(value),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        != 0
    ):
        return None
    return value.value


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``subprocess.Popen(preexec_fn=...)`` that makes the child get SIGKILL when this process
    (the thread calling Popen) dies; None where prctl is missing."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    option, sig, zero = (
        ctypes.c_int(PR_SET_PDEATHSIG),
        ctypes.c_ulong(signal.SIGKILL),
        ctypes.c_ulong(0),
    )

    def preexec() -> None:
        # Runs in the child between fork and exec: no imports, no locks, nothing but syscalls.
        prctl(option, sig, zero, zero, zero)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) plus the marker that makes a ``selm`` child bind to this process
    at start-up (needed where prctl is missing; harmless elsewhere)."""
    return {**(os.environ if env is None else env), DIE_WITH_PARENT_ENV: str(os.getpid())}


def _watch(parent: int) -> None:
    while True:
        time.sleep(WATCHDOG_INTERVAL_S)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent() -> None:
    """Make this process die with its current parent: the death signal, else a watchdog."""
    parent = os.getppid()
    if not set_parent_death_signal(parent):
        threading.Thread(
            target=_watch, args=(parent,), name="selm-parent-watchdog", daemon=True
        ).start()


def _die_with_forking_parent() -> None:
    set_parent_death_signal(os.getppid())


def forked_children_die_with_this_process() -> None:
    """Every child this process forks from now on (``os.fork``, multiprocessing's fork context)
    asks for SIGKILL when this process dies. Call once per process (hooks add up)."""
    os.register_at_fork(after_in_child=_die_with_forking_parent)


def bind_to_launcher() -> None:
    """At start-up: die with the launcher when one started this process for a job (torchrun's
    ranks, or children of our launchers); a process a user started is left alone (``nohup``
    and the like keep working)."""
    if os.environ.get(TORCHRUN_ENV) or os.environ.get(DIE_WITH_PARENT_ENV):
        die_with_parent()
