"""Records what a ``selm`` command writes, in every Python process it starts (tests only).

A test puts this folder on PYTHONPATH and sets SELM_TEST_WRITE_LOG (a JSONL file) and
SELM_TEST_WRITE_ROOT (a folder): Python then imports this module at start-up in the command and
in each of its Python children, and an audit hook (PEP 578) appends one JSON line per
file-system write under the root: the event, the path, and whether the write went through a
symbolic link. Events: ``open`` for writing (with its flags), ``mkdir``, ``rename`` (the
destination), ``mkstemp`` / ``mkdtemp`` and ``lock`` (``fcntl.flock`` of an open file).

A write went through a link when a folder on its path resolves elsewhere (the write lands in the
link's target), or when it opens an existing link at the name itself without O_EXCL or
O_NOFOLLOW (those fail on a link instead of following it). Creating a folder or renaming onto a
link replaces or fails on the link and never follows it.
"""

import json
import os
import sys

_LOG = os.environ.get("SELM_TEST_WRITE_LOG")
_ROOT = os.environ.get("SELM_TEST_WRITE_ROOT")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_SAFE_OPEN = os.O_EXCL | os.O_NOFOLLOW
_EVENTS = {"open", "os.mkdir", "os.rename", "tempfile.mkstemp", "tempfile.mkdtemp", "fcntl.flock"}
_NO_DIR_FD = (None, -1, -100)  # a path not relative to an open folder


def _under_root(path: str) -> bool:
    return path == _ROOT or path.startswith(_ROOT + os.sep)


def _through_link(path: str, flags: int | None) -> bool:
    parent = os.path.dirname(path)
    if os.path.realpath(parent) != parent:
        return True
    return flags is not None and os.path.islink(path) and not flags & _SAFE_OPEN


def _record(event: str, path, flags: int | None = None) -> None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return
    path = os.path.normpath(os.path.abspath(os.fspath(path)))
    if not _under_root(path):
        return
    line = {
        "pid": os.getpid(),
        "event": event,
        "path": path,
        "flags": flags,
        "through_link": _through_link(path, flags if event == "open" else None),
    }
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _hook(event: str, args: tuple) -> None:
    if event not in _EVENTS:
        return
    try:
        if event == "open":
            path, _mode, flags = args
            if isinstance(flags, int) and flags & _WRITE_FLAGS:
                _record("open", path, flags)
        elif event == "os.mkdir":
            if args[2] in _NO_DIR_FD:
                _record("mkdir", args[0])
        elif event == "os.rename":
            if args[2] in _NO_DIR_FD and args[3] in _NO_DIR_FD:
                _record("rename", args[1])
        elif event in ("tempfile.mkstemp", "tempfile.mkdtemp"):
            _record(event.split(".")[1], args[0])
        elif event == "fcntl.flock":
            fd = args[0] if isinstance(args[0], int) else args[0].fileno()
            _record("lock", os.readlink(f"/proc/self/fd/{fd}"))
    except Exception as exc:  # never break the command under test; say so in its log
        print(f"write audit: {event}: {type(exc).__name__}: {exc}", file=sys.stderr)


if _LOG and _ROOT:
    _ROOT = os.path.realpath(_ROOT)
    sys.addaudithook(_hook)
