"""Reading and writing the project's files: one record reader, one atomic writer, one hasher.

    for row, record in iter_records("train.jsonl"): ...   # (1-based row, dict | DataError)
    rows = read_records("pairs.parquet")                  # dicts; the first bad row raises
    write_jsonl_atomic(path, rows); write_json_atomic(path, obj); write_text_atomic(path, text)
    digest = hash_path(folder_or_file)
    write_checksums(folder, checksum_files(folder, names)); verify_checksums(folder, fix=...)
    replace_dir(new_folder, folder)                       # swap a finished folder into place

Records are JSONL (one JSON object per line; blank lines are not rows) or Parquet
(``pip install selm-mcore[data]``). A bad row becomes a ``DataError`` naming the file, the 1-based
row (the line number in JSONL), the rule and a fix.

Every write goes to a fresh temporary file in the same folder (``runtime.outputs``: O_EXCL, an
unpredictable name), is fsynced and renamed over the target: a reader (or a resumed run) sees
the old file or the complete new one, never a partial one; a link at the target is replaced,
never written through.

Checksums: a saved folder (checkpoint, exported HF model) carries ``checksums.json`` with the
size and sha256 of each file, written last; ``verify_checksums`` raises ``ChecksumError``
naming the first missing, truncated or changed file and the fix the caller gives. sha256 runs at
~2 GB/s on CPUs with SHA extensions (blake2b ~1.3 GB/s, measured on the CI machine).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Literal, overload

from selm_mcore.runtime.errors import UserError, naming_write_errors
from selm_mcore.runtime.outputs import new_temp_dir, new_temp_file

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


class DataError(UserError, ValueError):
    """A user-fixable problem in a data file, naming the file, the 1-based row, the rule, a fix."""

    def __init__(self, path: str | os.PathLike, row: int | None, rule: str, fix: str):
        self.path = str(path)
        self.row = row
        self.rule = rule
        self.fix = fix
        where = f"{self.path} row {row}" if row is not None else self.path
        super().__init__(f"{where}: {rule}. Fix: {fix}")


# --- reading ----------------------------------------------------------------------------------


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (1-based row, raw dict) or (row, DataError) for rows that do not even parse.

    A missing file or an unknown suffix raises ``DataError`` at once.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            path,
            None,
            "the file does not exist",
            "check the path (data.train_path, "
            "data.eval_prompts_path or the file named on the command line)",
        )
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    else:
        raise DataError(
            path,
            None,
            f"unknown file type {suffix!r}",
            "use JSONL (.jsonl, one JSON object per line) or Parquet (.parquet)",
        )


@overload
def read_records(
    path: str | os.PathLike, *, with_row_numbers: Literal[False] = False
) -> list[dict]: ...


@overload
def read_records(
    path: str | os.PathLike, *, with_row_numbers: Literal[True]
) -> list[tuple[int, dict]]: ...


def read_records(
    path: str | os.PathLike, *, with_row_numbers: bool = False
) -> list[dict] | list[tuple[int, dict]]:
    """Every record of a JSONL or Parquet file; the first row that does not parse raises.

    ``with_row_numbers`` returns (1-based row, record) pairs, the numbers ``DataError`` uses.
    """
    records: list[Any] = []
    for row, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        records.append((row, record) if with_row_numbers else record)
    return records


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    line_number,
                    DataError(
                        path,
                        line_number,
                        f"the line is not valid UTF-8 (byte {exc.start}: "
                        f"{raw[exc.start : exc.start + 4]!r})",
                        "re-encode the file as UTF-8",
                    ),
                )
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as exc:  # also a huge int, deep nesting
                yield line_number, unreadable_json(path, line_number, exc)
                continue
            if not isinstance(record, dict):
                yield (
                    line_number,
                    DataError(
                        path,
                        line_number,
                        f"a row must be a JSON object, got {type(record).__name__}",
                        'write one {"prompt": ..., "chosen": ..., "rejected": ...} object per line',
                    ),
                )
                continue
            yield line_number, record


def unreadable_json(path: Path, line_number: int | None, exc: Exception) -> DataError:
    """The bad row for a line ``json.loads`` refused: invalid JSON, an integer beyond Python's
    digit limit, or nesting deeper than the parser's recursion limit (any column: the line is
    parsed whole)."""
    if isinstance(exc, json.JSONDecodeError):
        rule = f"invalid JSON ({exc.msg} at column {exc.colno})"
        fix = "write exactly one JSON object per line (check quotes, escapes, commas)"
    elif isinstance(exc, RecursionError):
        rule = "the JSON is nested too deeply to read (arrays/objects inside each other)"
        fix = "flatten or drop that value (even in a column the rows do not use)"
    elif "digits" in str(exc):
        limit = sys.get_int_max_str_digits()
        rule = (
            f"the JSON holds a value that cannot be read (an integer of more than {limit} digits)"
        )
        fix = "write such a number as a string, or drop that value"
    else:
        rule = f"the JSON holds a value that cannot be read ({str(exc)[:200]})"
        fix = "check the line (and the tool that wrote it)"
    return DataError(path, line_number, rule, fix)


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading Parquet needs pyarrow: pip install 'selm-mcore[data]'") from exc
    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(
            path,
            None,
            f"not a readable Parquet file ({exc})",
            "rewrite the file with pyarrow/pandas, or use JSONL",
        ) from exc
    row_number = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
        try:
            records = batch.to_pylist()
        except UnicodeDecodeError:  # a string column holding invalid UTF-8: find the row(s)
            records = []
            for i in range(batch.num_rows):
                try:
                    records.extend(batch.slice(i, 1).to_pylist())
                except UnicodeDecodeError as exc:
                    records.append(
                        DataError(
                            path,
                            row_number + i + 1,
                            f"a text field is not valid UTF-8 ({exc.reason})",
                            "re-encode the text as UTF-8",
                        )
                    )
        for record in records:
            row_number += 1
            yield row_number, record


# --- atomic writes ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was; a full disk
    raises ``DiskFullError`` naming ``path`` (a failed write names no file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_write_errors(path):
        fd, tmp = new_temp_file(path)
    try:
        with naming_write_errors(path):
            encoding = None if "b" in mode else "utf-8"
            with os.fdopen(fd, mode, encoding=encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line (non-ASCII kept), written atomically."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON (non-JSON values written with ``str``), written atomically."""
    with atomic_open(path) as handle:
        json.dump(obj, handle, indent=2, default=str)
        handle.write("\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


# --- content hashes ---------------------------------------------------------------------------


def _hash_file(path: Path, digest: Any, full_hash_max_bytes: int) -> None:
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    chunk = 1 << 20
    with open(path, "rb") as f:
        if size <= full_hash_max_bytes:
            while block := f.read(chunk):
                digest.update(block)
        else:
            # Multi-GB weights / optimizer shards: size + head + middle + tail is enough to catch
            # truncation, replacement and partial writes without reading terabytes per resume.
            for offset in (0, size // 2 - chunk // 2, size - chunk):
                f.seek(max(offset, 0))
                digest.update(f.read(chunk))


def hash_path(
    path: str | os.PathLike, full_hash_max_bytes: int = 64 << 20, skip: Iterable[str] = ()
) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, size, content) entries.

    Files larger than ``full_hash_max_bytes`` are fingerprinted by size and three 1 MiB windows.
    ``skip``: folder-relative POSIX names of files left out (files rewritten later on purpose).
    """
    path = Path(path)
    digest = hashlib.sha256()
    skipped = set(skip)
    if path.is_file():
        _hash_file(path, digest, full_hash_max_bytes)
    elif path.is_dir():
        files = (p for p in path.rglob("*") if p.is_file())
        for file in sorted(f for f in files if f.relative_to(path).as_posix() not in skipped):
            digest.update(str(file.relative_to(path).as_posix()).encode() + b"\0")
            _hash_file(file, digest, full_hash_max_bytes)
    else:
        raise FileNotFoundError(f"{path} does not exist")
    return digest.hexdigest()


# --- checksums of saved folders ---------------------------------------------------------------

CHECKSUM_FILE = "checksums.json"
CHECKSUM_FORMAT = "selm-checksums/1"
CHECKSUM_ALGORITHM = "sha256"


class ChecksumError(UserError, ValueError):
    """A saved file that is missing, truncated or changed since its checksum was recorded."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


def file_checksum(path: str | os.PathLike) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex digest} of one file (read in 1 MiB blocks)."""
    digest, size = hashlib.new(CHECKSUM_ALGORITHM), 0
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
    return {"size": size, CHECKSUM_ALGORITHM: digest.hexdigest()}


def list_files(folder: str | os.PathLike, under: Iterable[str] = ("",)) -> list[str]:
    """Sorted folder-relative POSIX paths of the files below ``folder/<each of under>`` (a
    name in ``under`` may also be a single file); manifests are left out."""
    folder = Path(folder)
    names: set[str] = set()
    for part in under:
        path = folder / part
        found = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
        names.update(p.relative_to(folder).as_posix() for p in found if p.name != CHECKSUM_FILE)
    return sorted(names)


def checksum_files(folder: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``file_checksum`` of each folder-relative name."""
    return {name: file_checksum(Path(folder) / name) for name in names}


def write_checksums(folder: str | os.PathLike, entries: Mapping[str, dict[str, Any]]) -> Path:
    """Write ``folder/checksums.json`` (atomically) for folder-relative ``entries``."""
    path = Path(folder) / CHECKSUM_FILE
    write_json_atomic(
        path,
        {
            "format": CHECKSUM_FORMAT,
            "algorithm": CHECKSUM_ALGORITHM,
            "files": dict(sorted(entries.items())),
        },
    )
    return path


def read_checksums(folder: str | os.PathLike, *, fix: str) -> dict[str, dict[str, Any]] | None:
    """The recorded entries of ``folder/checksums.json``, or None when it has none."""
    path = Path(folder) / CHECKSUM_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != CHECKSUM_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        return manifest["files"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ChecksumError(path, f"the checksum list is unreadable ({exc})", fix) from None


def verify_checksums(
    folder: str | os.PathLike, names: Iterable[str] | None = None, *, fix: str
) -> int:
    """Check the files of ``folder/checksums.json`` (only ``names`` when given): present, of
    the recorded size, with the recorded digest. Returns the bytes checked (0 without a list).

    Raises ``ChecksumError`` naming the first bad file, with ``fix`` as the remedy.
    """
    folder = Path(folder)
    entries = read_checksums(folder, fix=fix)
    if entries is None:
        return 0
    checked = 0
    for name in sorted(entries) if names is None else names:
        recorded, path = entries[name], folder / name
        if not path.is_file():
            raise ChecksumError(path, f"the file is missing (listed in {CHECKSUM_FILE})", fix)
        size = path.stat().st_size
        if size != recorded["size"]:
            raise ChecksumError(
                path,
                f"the file has {size} bytes, {recorded['size']} were "
                "saved (truncated or partly written)",
                fix,
            )
        if file_checksum(path)[CHECKSUM_ALGORITHM] != recorded[CHECKSUM_ALGORITHM]:
            raise ChecksumError(
                path,
                f"the content differs from the {CHECKSUM_ALGORITHM} "
                f"recorded in {CHECKSUM_FILE} when it was saved (corrupt)",
                fix,
            )
        checked += size
    return checked


# --- swapping a finished folder into place ----------------------------------------------------

_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b`` (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put folder ``src`` at ``dst``; an existing ``dst`` is swapped out in one atomic step
    where the system allows (Linux), else renamed aside to a fresh name first, and then
    deleted. A ``dst`` that is a symbolic link is refused: the swap would move the link, not
    the folder it names, and a new folder is never written through a link."""
    src, dst = Path(src), Path(dst)
    if dst.is_symlink():
        raise FileExistsError(
            errno.EEXIST,
            f"{dst} is a symbolic link (to {os.readlink(dst)}); a folder is never swapped in "
            "through a link. Remove the link or write to the folder it names",
            str(dst),
        )
    if not dst.exists():
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src)  # now the old folder
        return
    trash = new_temp_dir(dst, "old")
    os.replace(dst, trash)  # over the fresh empty folder
    os.replace(src, dst)
    shutil.rmtree(trash, ignore_errors=True)
