"""selm_mcore.runtime.files: the record reader (JSONL / Parquet, row numbers), atomic writes,
hash_path, checksum lists (checked against hashlib directly; real checkpoints in tests/dist/) and
the atomic folder swap."""

from __future__ import annotations

import json
import os

import pytest

from selm_mcore.runtime.files import (
    CHECKSUM_FILE,
    ChecksumError,
    DataError,
    atomic_open,
    checksum_files,
    hash_path,
    iter_records,
    list_files,
    read_records,
    replace_dir,
    verify_checksums,
    write_checksums,
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
    pq.write_table(
        pa.Table.from_pylist([{"x": 1, "y": None}, {"x": 2, "y": "b"}]), tmp_path / "r.parquet"
    )
    assert read_records(tmp_path / "r.parquet", with_row_numbers=True) == [
        (1, {"x": 1, "y": None}),
        (2, {"x": 2, "y": "b"}),
    ]
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
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["obj.json", "rows.jsonl", "sub", "t.txt"]


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


def _saved_folder(tmp_path):
    folder = tmp_path / "saved"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "__0_0.distcp").write_bytes(os.urandom(3000))
    (folder / "meta.json").write_text('{"a": 1}\n')
    write_checksums(folder, checksum_files(folder, list_files(folder)))
    return folder


def test_checksum_list_records_size_and_sha256(tmp_path):
    import hashlib

    folder = _saved_folder(tmp_path)
    manifest = json.loads((folder / CHECKSUM_FILE).read_text())
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == ["meta.json", "model/__0_0.distcp"]  # not itself
    data = (folder / "model" / "__0_0.distcp").read_bytes()
    assert manifest["files"]["model/__0_0.distcp"] == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert verify_checksums(folder, fix="x") == len(data) + 9
    assert list_files(folder, ["model"]) == ["model/__0_0.distcp"]
    assert list_files(folder, ["meta.json"]) == ["meta.json"]


@pytest.mark.parametrize(
    "damage,problem",
    [
        ("flip", "the content differs from the sha256 recorded"),
        ("truncate", r"the file has 2999 bytes, 3000 were saved \(truncated"),
        ("delete", "the file is missing"),
    ],
)
def test_a_damaged_file_is_named_with_the_fix(tmp_path, damage, problem):
    folder = _saved_folder(tmp_path)
    shard = folder / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[1234] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-1]))
    else:
        shard.unlink()
    with pytest.raises(ChecksumError, match=rf"{shard}: {problem}.*Fix: use the copy") as info:
        verify_checksums(folder, fix="use the copy")
    assert info.value.path == str(shard)
    verify_checksums(folder, ["meta.json"], fix="x")  # a subset skips the bad file


def test_an_unreadable_checksum_list_is_named(tmp_path):
    folder = _saved_folder(tmp_path)
    (folder / CHECKSUM_FILE).write_text("{not json")
    with pytest.raises(
        ChecksumError,
        match=rf"{folder / CHECKSUM_FILE}: the checksum list is "
        "unreadable",
    ):
        verify_checksums(folder, fix="x")
    (folder / CHECKSUM_FILE).unlink()
    assert verify_checksums(folder, fix="x") == 0  # an older folder without a list


def test_replace_dir_swaps_a_folder_in_without_leftovers(tmp_path):
    from selm_mcore.runtime.files import _exchange

    old, new = tmp_path / "out", tmp_path / ".out.tmp"
    old.mkdir()
    (old / "model-00001-of-00002.safetensors").write_text("stale")
    new.mkdir()
    (new / "model.safetensors").write_text("fresh")
    replace_dir(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in old.iterdir()] == ["model.safetensors"]
    new.mkdir()
    replace_dir(new, tmp_path / "absent")
    assert (tmp_path / "absent").is_dir() and not new.exists()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    assert _exchange(a, b)  # Linux: one atomic swap
    assert (b / "x").exists() and not (a / "x").exists()
