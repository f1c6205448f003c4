"""Child processes: one supervisor for all of them, and children that die with their parent.

    with ChildProcesses() as children:             # every launcher: ranks, engines, phases
        child = children.start(argv, log_path, env=env)
        outcome = children.wait(timeout_s)          # all exited 0, one failed, or the deadline
    # here every child's process group is killed and reaped; child.returncode is final
    run_logged(cmd, log_path, timeout_s=600)        # one command, teed to a log and our stdout
    bind_to_launcher()      # at CLI start-up: a rank that torchrun (or our launcher) started
    freeze_heap_at_exit()   # at CLI start-up: a shorter interpreter shutdown

The supervisor (``ChildProcesses``) starts each child in its own session (so its whole process
group can be killed: the child and whatever it started), with the parent-death signal below,
its output in a log file; ``wait`` polls the children (copying one log to our console as it
grows, when asked) until all exited 0, one exited otherwise, or the deadline passed; leaving the
``with`` block kills every child's group and reaps the children. Its callers:
``runner.run_command`` (a phase of ``selm run``, through ``run_logged``),
``launch.run_local_ranks`` (N ranks with torchrun's environment),
``selm_mcore.rollout.engines.run_engines`` (data-parallel vLLM engines) and
``selm_mcore.eval.official`` (the benchmarks' official judges); each words its own error from
the outcome and the tail of the failed child's log.

A process killed with SIGKILL cannot clean up, so without the parent-death signal its children
run on as orphans: torchrun's ranks (each in its own session) keep training, a phase of ``selm
run`` keeps computing, Megatron's checkpoint-writer helpers keep their memory. The kernel can
instead send the child SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``). The request is
cleared at fork (and kept across exec), so every generation makes its own:

* the supervisor makes it in the child between fork and exec (``preexec_fn``), so it covers
  any program it starts (torchrun, srun, ``selm``);
* a rank started by torchrun, which is not ours, makes it at start-up (``bind_to_launcher`` in
  ``selm_mcore.cli``, when ``TORCHELASTIC_RUN_ID`` or ``SELM_DIE_WITH_PARENT`` is set);
* processes forked by a rank or an engine (``forked_children_die_with_this_process``, a fork
  hook) and Megatron's spawned checkpoint-writer manager (``selm_mcore.mcore.parallel``).

Linux sends the signal when the *thread* that started the child ends: children are started from
the thread that waits for them. Where prctl is missing (macOS), ``bind_to_launcher`` starts a
daemon thread that polls the parent pid every ``WATCHDOG_INTERVAL_S`` and kills the process
when it changes; the supervisor then sets ``SELM_DIE_WITH_PARENT`` so its children do so.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TextIO

from selm_mcore.runtime.outputs import open_log

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
DIE_WITH_PARENT_ENV = "SELM_DIE_WITH_PARENT"  # the launcher's pid
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun in every rank's environment
WATCHDOG_INTERVAL_S = 0.5
POLL_INTERVAL_S = 0.05  # how often the supervisor looks at its children
TAIL_READ_BYTES = 1 << 20  # at most this much of a log's end is read for an error message


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


_FREEZE_AT_EXIT = False


def freeze_heap_at_exit() -> None:
    """Register (once per process) an exit handler that collects the heap once and then freezes
    it (``gc.freeze``). Registered at start-up, it runs after the exit handlers registered later
    (logging, W&B, multiprocessing), and Python's shutdown then tears the modules down without
    examining the frozen heap again and again: about 1.6 s less CPU at the exit of every process
    that imported torch, Megatron and transformers (8.0 -> 6.4 user s for one that only imports
    them). Objects that are garbage by then are still finalized (the collection); outputs are
    unchanged."""
    global _FREEZE_AT_EXIT
    if not _FREEZE_AT_EXIT:
        atexit.register(_collect_and_freeze)
        _FREEZE_AT_EXIT = True


def _collect_and_freeze() -> None:
    gc.collect()
    gc.freeze()


def cuda_available() -> bool:
    """Whether this process sees a CUDA device (imports torch on the first call, unless torch is
    a CPU-only build): decides where the children of a job run (GPUs or CPU cores) and the
    checks of their layout."""
    from selm_mcore.runtime.device import torch_build_has_gpu

    if not torch_build_has_gpu():
        return False
    import torch

    return torch.cuda.is_available()


# --- the supervisor ---------------------------------------------------------------------------


def _signal_name(number: int) -> str:
    """``signal 9 (SIGKILL)``; the number alone for a signal Python does not name."""
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads: the child and whatever it started and left
    (torchrun's ranks, vLLM's workers, Megatron's checkpoint writers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Child:
    """A started child (the leader of its own process group) and the log of its output."""

    proc: subprocess.Popen
    log_path: Path
    log_start: int = 0  # its output starts at this offset of log_path (a log appended to)

    @property
    def returncode(self) -> int | None:
        """Its exit status (negative: killed by that signal); None while it runs."""
        return self.proc.returncode

    def output(self) -> str:
        """The end of what it wrote to its log (at most ``TAIL_READ_BYTES``)."""
        try:
            with open(self.log_path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self.log_start, size - TAIL_READ_BYTES))
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail_chars(self, max_chars: int) -> str:
        """The last ``max_chars`` characters of its output (``...`` first when cut)."""
        text = self.output()
        return text if len(text) <= max_chars else "...\n" + text[-max_chars:]

    def tail_lines(self, count: int) -> str:
        """The last ``count`` lines of its output."""
        lines = self.output().split("\n")
        if lines and not lines[-1]:
            lines.pop()
        return "\n".join(line.rstrip("\r") for line in lines[-count:])


@dataclass
class Outcome:
    """How ``ChildProcesses.wait`` ended: all exited 0 (``ok``), ``failed`` (the first child
    seen exiting non-zero), or ``timed_out`` with the children still ``running`` then."""

    failed: Child | None = None
    timed_out: bool = False
    running: list[Child] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed is None and not self.timed_out


class _Echo:
    """Copies what a log gains to a console stream (bytes as written, where it has a buffer)."""

    def __init__(self, child: Child, stream: TextIO):
        self.file = open(child.log_path, "rb")  # closed by close()
        self.file.seek(child.log_start)
        self.stream = stream

    def copy(self) -> None:
        data = self.file.read()
        if not data:
            return
        self.stream.flush()
        buffer: BinaryIO | None = getattr(self.stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            self.stream.write(data.decode(errors="replace"))
            self.stream.flush()

    def close(self) -> None:
        self.copy()
        self.file.close()


class ChildProcesses:
    """The children of one job, supervised together: started in their own sessions, dying with
    this process, waited for with one deadline, and killed together (each one's whole process
    group) when the ``with`` block ends, however it ends (an error, Ctrl-C, SystemExit)."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self._echoes: list[_Echo] = []

    def start_worker(
        self, kind: str, spec: Mapping[str, Any], folder: Path, name: str, env: Mapping[str, str]
    ) -> Child:
        """Start ``selm _worker KIND SPEC``: ``spec`` written to FOLDER/NAME.spec.json, the log
        in FOLDER/NAME.log, ``env`` added to this process's environment."""
        spec_path = folder / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-P", "-m", "selm_mcore.cli", "_worker", kind, str(spec_path)]
        return self.start(argv, folder / f"{name}.log", env={**os.environ, **env})

    def start(
        self,
        argv: Sequence[str],
        log_path: str | os.PathLike,
        *,
        stdout_path: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        append: bool = False,
        echo_to: TextIO | None = None,
    ) -> Child:
        """Start ``argv`` with its stdout and stderr in ``log_path`` (appended to with ``append``;
        stdout apart in ``stdout_path`` when given). ``env``: its whole environment (default:
        ours). ``echo_to``: copy what it writes to ``log_path`` to this stream while waiting."""
        with contextlib.ExitStack() as files:
            log = files.enter_context(open_log(log_path, append=append, binary=True))
            out = (
                files.enter_context(open_log(stdout_path, append=False, binary=True))
                if stdout_path
                else log
            )
            log_start = log.seek(0, os.SEEK_END)
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=log,
                env=child_env(dict(env) if env is not None else None),
                cwd=cwd,
                start_new_session=True,  # its own process group, killed as a whole
                preexec_fn=die_with_parent_preexec(),
            )
        child = Child(proc, Path(log_path), log_start)
        self.children.append(child)
        if echo_to is not None:
            self._echoes.append(_Echo(child, echo_to))
        return child

    def wait(self, timeout_s: float | None = None, *, settle_s: float = 0.0) -> Outcome:
        """Wait until every child exited 0, one exited otherwise (then ``settle_s`` more
        seconds, in which the others may write their own error), or ``timeout_s`` seconds
        passed (no deadline when None or 0)."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while True:
            for echo in self._echoes:
                echo.copy()
            codes = [child.proc.poll() for child in self.children]
            failed = [child for child, code in zip(self.children, codes) if code not in (None, 0)]
            if failed:
                # Children that fail for one cause (a bad model) fail together: after the settle
                # time, the first of them in start order is the one reported, whichever was first.
                time.sleep(settle_s)
                codes = [child.proc.poll() for child in self.children]
                failed = [c for c, code in zip(self.children, codes) if code not in (None, 0)]
                return Outcome(failed=failed[0])
            if all(code == 0 for code in codes):
                return Outcome()
            if deadline is not None and time.monotonic() > deadline:
                running = [child for child, code in zip(self.children, codes) if code is None]
                return Outcome(timed_out=True, running=running)
            time.sleep(POLL_INTERVAL_S)

    def close(self) -> None:
        """Kill every child's process group (stragglers of finished children too) and reap."""
        for child in self.children:
            kill_group(child.proc)
        for child in self.children:
            child.proc.wait()
        for echo in self._echoes:
            echo.close()
        self._echoes.clear()

    def __enter__(self) -> ChildProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class CommandFailed(RuntimeError):
    """A command of ``run_logged`` exited non-zero, was killed or ran past its deadline."""


def run_logged(
    cmd: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    timeout_setting: str = "timeout_s",
    tail_lines: int = 30,
) -> None:
    """Run ``cmd`` with its output appended to ``log_path`` and copied to our stdout as it comes
    (a tee); ``env`` is added to our environment. Raises CommandFailed naming the command and
    the exit status or signal, the log file and the last lines of output; or, after
    ``timeout_s`` (the value of ``timeout_setting``), that it was killed."""
    command = shlex.join(cmd)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", command)
    with open_log(log_path, binary=True) as log:
        log.write(f"$ {command}\n".encode())
    with ChildProcesses() as children:
        child = children.start(
            cmd, log_path, env={**os.environ, **(env or {})}, append=True, echo_to=sys.stdout
        )
        outcome = children.wait(timeout_s)
    if outcome.timed_out:
        raise CommandFailed(
            f"`{command}` ran longer than {timeout_setting}={timeout_s} s and was killed "
            f"(log: {log_path})"
        )
    code = child.proc.wait()  # reaped already: its final status
    if code != 0:
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        tail = child.tail_lines(tail_lines)
        raise CommandFailed(f"`{command}` {how} (full log: {log_path}); last output:\n{tail}")
