"""selm_mcore.files: the record reader (JSONL / Parquet, row numbers), atomic writes, hash_path."""

from __future__ import annotations

import json
import os

import pytest

from selm_mcore.files import (
    DataError,
    atomic_open,
    hash_path,
    iter_records,
    read_records,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)


def test_iter_records_numbers_rows_by_line_and_yields_bad_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n\n[1]\n{"a": \n{"b": "\xc3\xa9"}\n')
    rows = list(iter_records(path))
    assert [row for row, _ in rows] == [1, 3, 4, 5]  # blank lines are not rows
    assert rows[0][1] == {"a": 1} and rows[3][1] == {"b": "é"}
    assert isinstance(rows[1][1], DataError) and "got list" in str(rows[1][1])
    assert isinstance(rows[2][1], DataError) and rows[2][1].row == 4
    assert "invalid JSON" in str(rows[2][1])


def test_read_records_raises_on_the_first_bad_row_and_on_a_missing_file(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "r.jsonl", [{"x": 1}, {"x": 2}])
    assert read_records(path) == [{"x": 1}, {"x": 2}]
    with open(path, "a") as f:
        f.write("\n{broken\n")
    with pytest.raises(DataError, match=r"r\.jsonl row 4: invalid JSON"):
        read_records(path)
    # Unlike the old metrics.read_jsonl (which returned []), a missing file is an error.
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")


def test_read_records_with_row_numbers_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "r.jsonl"
    path.write_text('\n{"x": 1}\n\n{"x": 2}\n')
    assert read_records(path, with_row_numbers=True) == [(2, {"x": 1}), (4, {"x": 2})]
    pq.write_table(pa.Table.from_pylist([{"x": 1, "y": None}, {"x": 2, "y": "b"}]),
                   tmp_path / "r.parquet")
    assert read_records(tmp_path / "r.parquet", with_row_numbers=True) == [
        (1, {"x": 1, "y": None}), (2, {"x": 2, "y": "b"})]
    (tmp_path / "r.txt").write_text("x\n")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        read_records(tmp_path / "r.txt")


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    rows = [{"text": "naïve"}, {"n": 2}]
    write_jsonl_atomic(tmp_path / "sub" / "rows.jsonl", rows)
    raw = (tmp_path / "sub" / "rows.jsonl").read_bytes()
    assert raw.decode("utf-8") == '{"text": "naïve"}\n{"n": 2}\n'  # non-ASCII kept as is
    assert read_records(tmp_path / "sub" / "rows.jsonl") == rows
    write_json_atomic(tmp_path / "obj.json", {"path": tmp_path, "n": 1})
    assert json.loads((tmp_path / "obj.json").read_text()) == {"path": str(tmp_path), "n": 1}
    write_text_atomic(tmp_path / "t.txt", "hello\n")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["obj.json", "rows.jsonl", "sub",
                                                           "t.txt"]


def test_a_failed_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl_atomic(path, [{"old": True}])
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path) as handle:
            handle.write('{"new": true}\n')
            raise RuntimeError("disk full")
    assert read_records(path) == [{"old": True}]
    assert os.listdir(tmp_path) == ["rows.jsonl"]  # the temporary file is gone
    with pytest.raises(TypeError):  # a row that is not JSON: the old file stays too
        write_jsonl_atomic(path, [{"x": object()}])
    assert read_records(path) == [{"old": True}]


def test_hash_path_folders_and_large_file_fingerprint(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.bin").write_bytes(b"1" * 100)
    (folder / "y.bin").write_bytes(b"2" * 100)
    base = hash_path(folder)
    (folder / "a" / "x.bin").rename(folder / "a" / "z.bin")
    assert hash_path(folder) != base  # names are part of the hash

    big = tmp_path / "big.bin"
    data = bytearray(os.urandom(5 << 20))
    big.write_bytes(data)
    small_limit = 1 << 20
    fingerprint = hash_path(big, full_hash_max_bytes=small_limit)
    assert fingerprint != hash_path(big)  # fingerprint mode is used above the limit
    for offset in (0, len(data) // 2, len(data) - 1):  # head, middle, tail windows
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        big.write_bytes(changed)
        assert hash_path(big, full_hash_max_bytes=small_limit) != fingerprint
    big.write_bytes(data[:-1])  # truncation
    assert hash_path(big, full_hash_max_bytes=small_limit) != fingerprint
    with pytest.raises(FileNotFoundError):
        hash_path(tmp_path / "nope")
