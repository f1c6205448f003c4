"""What every command writes next to its outputs: one lock per output, the overwrite rule, and
temporary, swap and log names, none of which follows a planted symbolic link.

    with output_locks({out_dir: "train.output_dir"}, command="selm train"): ...
    refuse_finished(out_dir / "final", setting="train.output_dir", overwrite=args.overwrite,
                    what="a trained model")
    fd, tmp = new_temp_file(target)              # .NAME.<random>.tmp beside target
    tmp_dir = new_temp_dir(target, "export")     # .NAME.<random>.export beside target
    with open_log(path, append=True) as log: ...  # a link at path is removed, never followed

Every temporary, lock and swap name the project writes is made here (a test scans the source
for any other), by these rules:

* Temporary and swap names are fresh and unpredictable: ``tempfile`` creates them in the
  target's own folder (so the final rename stays on one filesystem) with O_EXCL (a file) or
  mkdir (a folder); both fail on any existing name, a link included, and tempfile then tries
  another name, so a link planted in advance is never written through. Leftovers of an
  interrupted attempt at the same target are removed by the next attempt (``clear_stale``),
  which holds the output's lock; a link among them is unlinked, never followed.
* A lock is ``.NAME.lock`` beside its output (a file or a folder: a folder swapped in whole
  keeps its lock), opened with O_NOFOLLOW: a link planted at the name is removed (logged) and
  never followed, nothing is truncated. The lock holds the holder's pid and command; a second
  writer is refused at once naming them (``OutputBusyError``). Only rank 0 of a launch
  (``RANK``) takes it, for the whole job; it is removed when released. A process started by the
  holder inherits its locks (``SELM_HELD_LOCKS``), so a command's own helper processes may
  write into the output it locked.
* A log or metrics file appended to across runs is opened with O_NOFOLLOW after a link at its
  name is removed (logged): an append never lands in a link's target.
* A finished output is never replaced silently (``refuse_finished``): the command refuses,
  naming ``--overwrite`` and a new location.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from selm_mcore.runtime.errors import UserError

logger = logging.getLogger(__name__)

HELD_LOCKS_ENV = "SELM_HELD_LOCKS"
_RANDOM_PART = r"[a-z0-9_]{8}"  # tempfile's random names: 8 of [a-z0-9_]


class OutputBusyError(UserError, RuntimeError):
    """Another command holds the lock of an output this command would write."""


class OutputExistsError(UserError, ValueError):
    """A finished output that is not to be replaced without ``--overwrite`` (every rank sees
    the same output: reported once, by rank 0)."""


class LinkRefusedError(UserError, OSError):
    """A name this project derives (a lock, a log) turned into a link while it was opened."""


# --- temporary and swap names -----------------------------------------------------------------


def _beside(target: str | os.PathLike) -> Path:
    target = Path(os.path.abspath(target))
    if not target.name:
        raise ValueError(f"{target} has no name to put a temporary name beside")
    return target


def stale_temps(target: str | os.PathLike, tag: str = "tmp") -> list[Path]:
    """Temporary names earlier attempts at ``target`` left (``new_temp_*`` with ``tag``)."""
    target = _beside(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{_RANDOM_PART}\.{re.escape(tag)}")
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))


def remove_path(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def remove_stale_temps(target: str | os.PathLike, tag: str = "tmp") -> list[Path]:
    """Delete what ``stale_temps`` finds (a link is unlinked, never followed)."""
    found = stale_temps(target, tag)
    for path in found:
        logger.info("removing %s, left by an interrupted attempt", path)
        remove_path(path)
    return found


def new_temp_file(target: str | os.PathLike, tag: str = "tmp") -> tuple[int, Path]:
    """A fresh file ``.NAME.<random>.TAG`` beside ``target``, created with O_EXCL; its open
    descriptor and path."""
    target = _beside(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".{tag}", dir=target.parent)
    return fd, Path(name)


def new_temp_dir(target: str | os.PathLike, tag: str = "tmp", *, clear_stale: bool = False) -> Path:
    """A fresh empty folder ``.NAME.<random>.TAG`` beside ``target``. ``clear_stale``: first
    delete what earlier attempts at ``target`` left (only while holding its lock)."""
    target = _beside(target)
    if clear_stale:
        remove_stale_temps(target, tag)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=f".{tag}", dir=target.parent))
    path.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; the renamed one is not
    return path


def _umask() -> int:
    """This process's file-mode creation mask (read, not changed, where Linux shows it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temp_folder(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh private folder (in ``parent``, else the system's temporary folder) for files a
    command hands to its own processes (specs, logs); deleted with its content afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as name:
        yield Path(name)


@contextlib.contextmanager
def temp_path_for(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A fresh, empty file beside ``target`` (ending in ``suffix``, for writers that pick the
    format by the extension) for a writer that takes a path; removed unless renamed away."""
    target = _beside(target)
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
    )
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


# --- files opened at a derived name -----------------------------------------------------------


def _remove_link(path: Path) -> None:
    if path.is_symlink():
        logger.warning(
            "%s is a symbolic link (to %s): removing the link, its target is not touched",
            path,
            os.readlink(path),
        )
        path.unlink()


def open_no_follow(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` with O_NOFOLLOW; a link at ``path`` is removed first, never followed."""
    path = Path(path)
    _remove_link(path)
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise LinkRefusedError(
            exc.errno,
            f"{path} became a symbolic link while it was opened; it is never followed. Remove "
            "it and run the command again",
        ) from None


def open_log(path: str | os.PathLike, *, append: bool = True, binary: bool = False) -> IO[Any]:
    """Open a log or metrics file for writing (appending with ``append``, else truncated),
    without following a link at its name."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = open_no_follow(path, flags)
    mode = ("a" if append else "w") + ("b" if binary else "")
    return os.fdopen(fd, mode, encoding=None if binary else "utf-8")


def is_plain_file(path: str | os.PathLike) -> bool:
    """A regular file that is not a link (what a derived name may be read back from)."""
    return Path(path).is_file() and not Path(path).is_symlink()


# --- locks ------------------------------------------------------------------------------------


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of output ``target``: ``.NAME.lock`` beside it."""
    target = _beside(target)
    return target.parent / f".{target.name}.lock"


def _held_locks() -> dict[str, int]:
    """{lock path: pid} of the locks held for this process by the processes that started it
    (and by itself): ``PID=PATH`` lines of SELM_HELD_LOCKS."""
    held = {}
    for entry in os.environ.get(HELD_LOCKS_ENV, "").split("\n"):
        pid, _, path = entry.partition("=")
        if path and pid.isdigit():
            held[path] = int(pid)
    return held


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _acquire(path: Path, setting: str, target: Path, wait: bool) -> int:
    """Lock ``path`` (created if missing); the open descriptor holding it."""
    from selm_mcore.runtime.preflight import check_output_dir  # it makes temporary names here

    check_output_dir(path.parent, what=setting)  # a folder that cannot be written is named
    for _ in range(100):
        fd = open_no_follow(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip().split(" ", 1)
            os.close(fd)
            pid = holder[0] or "unknown"
            command = holder[1] if len(holder) > 1 else "a selm command"
            raise OutputBusyError(
                f"{setting}={target} is being written by another process (pid {pid}: "
                f"{command}; lock {path}); two writers would mix or replace each other's files. "
                f"Wait for pid {pid} to finish, or choose another {setting}"
            ) from None
        if _same_file(fd, path):  # not a file its holder removed while this one opened it
            return fd
        os.close(fd)
    raise RuntimeError(f"{path} kept being replaced while it was being locked")


def _release(fd: int, path: Path) -> None:
    try:
        if _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_locks(
    outputs: Mapping[Path, str] | Mapping[str, str], *, command: str, wait: bool = False
) -> Iterator[None]:
    """Hold the lock of each output (a file or folder path -> the setting or flag naming it)
    while the block runs; a second writer of any of them is refused at once naming this
    process's pid and ``command`` (``wait``: waits for the holder instead). Ranks other than 0
    of a launch take no lock."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    held_before = _held_locks()
    # Locks an ancestor holds (the environment only flows to children); this process's own
    # entries do not count, so a second lock of the same output here is refused too.
    inherited = {path for path, pid in held_before.items() if pid != os.getpid()}
    wanted = {
        lock_path(target): (Path(os.path.abspath(target)), setting)
        for target, setting in outputs.items()
    }
    held: list[tuple[int, Path]] = []
    previous_env = os.environ.get(HELD_LOCKS_ENV)
    try:
        for path in sorted(wanted):
            if str(path) in inherited:
                continue
            target, setting = wanted[path]
            fd = _acquire(path, setting, target, wait)
            held.append((fd, path))
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        entries = {**held_before, **{str(path): os.getpid() for _, path in held}}
        os.environ[HELD_LOCKS_ENV] = "\n".join(f"{pid}={p}" for p, pid in entries.items())
        yield
    finally:
        if previous_env is None:
            os.environ.pop(HELD_LOCKS_ENV, None)
        else:
            os.environ[HELD_LOCKS_ENV] = previous_env
        for fd, path in reversed(held):
            _release(fd, path)


# --- finished outputs -------------------------------------------------------------------------


def refuse_finished(
    path: str | os.PathLike, *, setting: str, overwrite: bool, what: str = "a finished output"
) -> None:
    """Refuse to replace an existing ``path`` unless ``overwrite`` (``--overwrite``)."""
    path = Path(path)
    if overwrite or not os.path.lexists(path):
        return
    raise OutputExistsError(
        f"{path} already holds {what} ({setting}); a finished output is never replaced "
        f"silently. Pass --overwrite to replace it, or choose a new {setting}"
    )


def add_overwrite_argument(parser, what: str) -> None:
    """The ``--overwrite`` flag of a command whose outputs ``refuse_finished`` guards."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} when it exists (without it an existing one is refused)",
    )
