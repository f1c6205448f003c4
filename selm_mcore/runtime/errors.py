"""User errors and how a command reports them: one message for a problem the user can fix, the
traceback for a bug.

    class ConfigError(UserError, ValueError): ...              # every user-fixable error class
    raise InputError("--rows and --out go together")          # any user-fixable problem
    with naming_write_errors(path):                            # ENOSPC -> DiskFullError(path)
        ...
    message = user_message(exc)        # the one-line report, or None for a bug

What counts as a user error (``user_message`` returns its message):

* ``UserError`` and its subclasses: every error class of the project for a problem the user
  can fix inherits it (``InputError``, ``DiskFullError`` here; ``ConfigError``, ``DataError``,
  ``OnlineError``, ``CheckpointError``, ``PlanError``, ... where they are raised), keeping its
  other base (``ValueError``, ``RuntimeError``) for callers that catch that;
* an ``OSError`` that names its file (missing input, not a folder, permission denied);
* a full disk or quota (errno ENOSPC, EDQUOT) anywhere in the exception chain: the message
  names the file when known and the free space of its filesystem. A writer that loses the
  errno (torch's checkpoint writer process reports "unexpected pos") is caught where the
  write happens, by ``naming_write_errors(path, needed_bytes)``: less free space than the
  write needs.

Everything else is a bug and keeps its traceback. ``selm_mcore.cli`` applies this to every
command.
"""

from __future__ import annotations

import contextlib
import errno
import os
import reprlib
import shutil
from collections.abc import Iterator
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# OSErrors about a file the user named (or a folder to write into).
FILE_ERRNOS = (
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EEXIST,
    errno.ENOTEMPTY,
)


class UserError(Exception):
    """A problem the user can fix; the command prints its message alone (no traceback)."""


# A value a user wrote may be huge (a 1 MB string, a list of YAML aliases that expands
# exponentially): messages show it through this bounded repr, never through repr().
SHORT_REPR_CHARS = 120


def clip_text(text: str, limit: int = SHORT_REPR_CHARS) -> str:
    """``text`` cut to ``limit`` characters (with "..." when cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a few items per container, two levels and about 120 characters:
    the work is bounded whatever the value (``repr`` of a shared, nested list is not)."""
    bounded = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
    bounded.maxlevel = 2
    bounded.maxtuple = bounded.maxlist = bounded.maxdict = bounded.maxset = 4
    bounded.maxstring = bounded.maxother = 60
    try:
        text = bounded.repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        text = f"<{type(value).__name__} too large to show>"
    return clip_text(text)


class InputError(UserError, ValueError):
    """A command's input (an argument, a file, a model folder) that cannot be used as given."""


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent), or None."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


class DiskFullError(UserError):
    """Writing ``path`` ran out of disk space (or quota); names the path, the free space and,
    where known, the space needed."""

    def __init__(
        self,
        path: str | os.PathLike | None,
        needed_bytes: int | None = None,
        free: int | None = None,
        headline: str | None = None,
    ):
        self.path = None if path is None else str(path)
        self.needed_bytes = needed_bytes
        self.free = free if free is not None else (free_bytes(path) if path else None)
        where = f" while writing {self.path}" if self.path else ""
        parts = [headline or f"no space left on the device{where}"]
        if needed_bytes is not None:
            parts.append(f"needs about {format_bytes(needed_bytes)}")
        if self.free is not None:
            parts.append(f"{format_bytes(self.free)} free")
        fix = (
            "free space there, or point the output (train.output_dir, train.ref_cache, "
            "online.workdir, --out / --out-dir) at a filesystem with room"
        )
        super().__init__(f"{'; '.join(parts)}. Fix: {fix}")


@contextlib.contextmanager
def naming_write_errors(path: str | os.PathLike, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into ``DiskFullError`` naming ``path`` (a write
    error carries no file name), and an OSError without a file name into one naming it.

    With ``needed_bytes``, any failure that leaves less free space than that on the
    filesystem of ``path`` is reported as a full disk too: some writers lose the errno (torch's
    checkpoint writer reports ENOSPC as "unexpected pos"), the free space does not lie.
    """
    try:
        yield
    except (DiskFullError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # torch's CheckpointException derives from BaseException
        if _disk_full_link(exc) is not None:
            raise DiskFullError(path, needed_bytes) from exc
        free = free_bytes(path) if needed_bytes else None
        if needed_bytes and free is not None and free < needed_bytes:
            first_line = (str(exc).strip().splitlines() or [""])[-1][:200]
            raise DiskFullError(
                path,
                needed_bytes,
                free,
                headline=(
                    f"writing {path} failed ({type(exc).__name__}: {first_line}): the disk is full "
                    "(less free space left than the write needs)"
                ),
            ) from exc
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, f"{exc.strerror} (writing {path})", str(path)) from exc
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 32:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _disk_full_link(exc: BaseException) -> OSError | None:
    """The link of the chain that says the disk is full: an OSError with ENOSPC/EDQUOT."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return link
    return None


def user_message(exc: BaseException) -> str | None:
    """The message to print for a user error, or None when ``exc`` is a bug (traceback)."""
    if isinstance(exc, UserError):
        return str(exc)
    full = _disk_full_link(exc)
    if full is not None:
        return str(DiskFullError(full.filename))
    if isinstance(exc, OSError) and exc.errno in FILE_ERRNOS and exc.filename is not None:
        return str(exc)
    if isinstance(exc, FileNotFoundError):  # raised by our own checks with the path in the text
        return str(exc)
    return None


def is_rank_local(exc: BaseException) -> bool:
    """True for errors one rank may meet alone (its own disk, its own files): every rank
    reports these; the others (config, data, layout) are reported by rank 0 only."""
    return _disk_full_link(exc) is not None or any(
        isinstance(link, (OSError, DiskFullError)) for link in _chain(exc)
    )
