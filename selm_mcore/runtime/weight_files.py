"""HF safetensors weight files, streamed: a reader of row ranges and a writer of planned shards.

    reader = SafetensorsReader(hf_dir)                  # single file or sharded with an index
    rows = reader.read("model.embed_tokens.weight", (V, H), rows=slice(a, b))

    writer = StreamingSafetensorsWriter(out_dir, [(name, shape, dtype), ...], max_shard_bytes)
    for name, tensor in tensors: writer.write(name, tensor)   # in plan order, one at a time
    writer.close()                                            # + the index when sharded

    write_safetensors(named_tensors, folder)             # a list of (name, tensor) pairs at once

The reader uses positioned file reads of only the requested rows (no memory map, so resident
memory holds only what is being copied). Headers are checked before anything is allocated from
them: the header length within the file (and the format's 100 MB limit), every tensor's shape,
dtype and byte range within the data section (a header claiming 2^62 bytes is a damaged file,
named, not a MemoryError). ``check_hf_tensors`` compares a folder's tensors with what a model
reads: every tensor read exactly by the model (none left over, none missing), with the expected
shape and a floating-point dtype (F32, BF16, F16, F64; no quantised format is supported); the
reader records which tensors a load read (``consumed``).

The writer plans every shard's header from (name, shape, dtype) up front, so each tensor goes
to disk as it arrives and no shard is buffered.
Both the Megatron exporter (``selm_mcore.mcore.weights.export_hf``) and the vLLM weight reload
(``selm_mcore.rollout.vllm_engine``) write through the one writer. No Megatron, no vLLM here.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from io import BufferedWriter
from pathlib import Path
from typing import Any

import torch

from selm_mcore.runtime.errors import UserError, short_repr

HF_INDEX_FILE = "model.safetensors.index.json"
HF_SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
# safetensors dtype names <-> torch dtypes
_ST_TO_TORCH = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {dtype: name for name, dtype in _ST_TO_TORCH.items()}
# Bytes per element of the safetensors dtypes (those not in _ST_TO_TORCH are never loaded).
_ITEMSIZE = {
    **{name: dtype.itemsize for name, dtype in _ST_TO_TORCH.items()},
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
# The safetensors format's own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000
# Buffers some exporters save beside the weights; transformers skips them at load, so do we.
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
# How many tensors of each kind a mismatch message names.
_NAMED = 5


class WeightsError(UserError, ValueError):
    """HF weights that do not fit the model (missing file or tensor, wrong shape, config)."""


# --- reading ------------------------------------------------------------------------------------


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section) of a safetensors file, every entry
    checked against the file's size before anything is allocated from it."""
    file_size = path.stat().st_size
    damaged = "the file is damaged or not safetensors; copy it again"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path} has {file_size} bytes, too few for a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        if size > min(MAX_HEADER_BYTES, file_size - 8):
            raise WeightsError(
                f"{path}: the header claims {size} bytes but the file has {file_size} (and the "
                f"format allows at most {MAX_HEADER_BYTES}); {damaged}"
            )
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise WeightsError(f"{path}: the header is not valid JSON; {damaged}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the header is not a JSON object; {damaged}")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        problem = _entry_problem(entry, file_size - 8 - size)
        if problem:
            raise WeightsError(f"{path}: tensor {short_repr(name)} {problem}; {damaged}")
    return header, 8 + size


def _entry_problem(entry: Any, data_bytes: int) -> str | None:
    """What is wrong with one header entry (dtype, shape, byte range), or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return "has no dtype"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"has shape {short_repr(shape)}, not a list of sizes"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        return f"claims bytes {short_repr(offsets)} outside the {data_bytes} bytes of data"
    itemsize = _ITEMSIZE.get(entry["dtype"])
    if itemsize is not None and offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        return (
            f"claims {offsets[1] - offsets[0]} bytes for shape {shape} of {entry['dtype']} "
            f"({math.prod(shape) * itemsize} expected)"
        )
    return None


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded folder's index file: {tensor name: shard file name}."""
    try:
        weight_map = json.loads(index_path.read_bytes().decode("utf-8")).get("weight_map")
    except (ValueError, AttributeError, RecursionError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise WeightsError(
            f"{index_path}: not an index of shards (a JSON object whose weight_map maps tensor "
            "names to file names); copy the complete model folder again"
        )
    return weight_map


class SafetensorsReader:
    """Reads (row ranges of) tensors from an HF folder's safetensors files, one at a time.

    Reads with plain positioned file reads into fresh buffers instead of memory-mapping the
    files, so resident memory holds only what is being copied (a memory map would keep every
    page touched so far resident until the file is closed).
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = Path(hf_dir)
        self._headers: dict[str, tuple[dict, int]] = {}
        self.consumed: set[str] = set()  # the tensors read so far
        index_path = self.hf_dir / HF_INDEX_FILE
        if index_path.is_file():
            weight_map = _read_weight_map(index_path)
            missing = sorted(set(weight_map.values()) - {p.name for p in self.hf_dir.iterdir()})
            if missing:
                example = next(k for k, v in weight_map.items() if v == missing[0])
                raise WeightsError(
                    f"{index_path} lists shard file(s) {missing} that are not in {self.hf_dir} "
                    f"(e.g. tensor {example!r} lives in {missing[0]}); copy the complete model "
                    "folder"
                )
            self.weight_map = dict(weight_map)
        else:
            files = (
                [self.hf_dir / HF_SINGLE_FILE]
                if (self.hf_dir / HF_SINGLE_FILE).is_file()
                else sorted(self.hf_dir.glob("*.safetensors"))
            )
            if not files:
                raise WeightsError(
                    f"no safetensors weights in {self.hf_dir} (expected {HF_SINGLE_FILE} or "
                    f"{HF_INDEX_FILE} with its shards); save the model with "
                    "save_pretrained(safe_serialization=True)"
                )
            self.weight_map = {}
            for path in files:
                for name in self._header(path.name)[0]:
                    self.weight_map[name] = path.name

    def _header(self, file_name: str) -> tuple[dict, int]:
        if file_name not in self._headers:
            self._headers[file_name] = _read_safetensors_header(self.hf_dir / file_name)
        return self._headers[file_name]

    def entries(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{tensor name: (safetensors dtype, shape)} of every tensor of the folder (headers
        only); a tensor the index lists in a file that does not hold it is named."""
        out = {}
        for name, file_name in self.weight_map.items():
            header, _ = self._header(file_name)
            if name not in header:
                raise WeightsError(
                    f"tensor {name!r} is not in {self.hf_dir / file_name} (as the index says)"
                )
            out[name] = (header[name]["dtype"], tuple(header[name]["shape"]))
        return out

    def read(
        self,
        name: str,
        expected_shape: tuple[int, ...],
        rows: slice | None = None,
        cols: slice | None = None,
    ) -> torch.Tensor:
        """Tensor ``name`` (only ``[rows, cols]`` of it), after checking its full shape.

        Only the requested rows are read from disk; a column slice reads those rows whole and
        returns a view (transient memory: one tensor).
        """
        if name not in self.weight_map:
            raise WeightsError(f"tensor {name!r} is missing from the safetensors in {self.hf_dir}")
        path = self.hf_dir / self.weight_map[name]
        header, data_start = self._header(self.weight_map[name])
        if name not in header:
            raise WeightsError(f"tensor {name!r} is not in {path} (as the index says)")
        entry = header[name]
        shape = tuple(entry["shape"])
        if shape != tuple(expected_shape):
            raise WeightsError(
                f"tensor {name!r} in {path} has shape {shape}, config.json "
                f"implies {tuple(expected_shape)}"
            )
        if entry["dtype"] not in FLOAT_DTYPES:
            raise WeightsError(
                f"tensor {name!r} in {path} is {entry['dtype']}; only floating-point weights "
                f"({', '.join(FLOAT_DTYPES)}) load"
            )
        self.consumed.add(name)
        dtype = _ST_TO_TORCH[entry["dtype"]]
        first, last = (rows or slice(None)).indices(shape[0])[:2] if shape else (0, 1)
        row_numel = int(torch.Size(shape[1:]).numel())
        itemsize = torch.empty((), dtype=dtype).element_size()
        begin = data_start + entry["data_offsets"][0] + first * row_numel * itemsize
        buffer = bytearray((last - first) * row_numel * itemsize)
        if buffer:
            with open(path, "rb") as f:
                f.seek(begin)
                if f.readinto(buffer) != len(buffer):
                    raise WeightsError(f"{path} is truncated (tensor {name!r})")
            tensor = torch.frombuffer(buffer, dtype=dtype)
        else:
            tensor = torch.empty(0, dtype=dtype)
        tensor = tensor.view(last - first, *shape[1:]) if shape else tensor.view(())
        return tensor if cols is None else tensor[:, cols]


def _natural(name: str) -> list[Any]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _named(items: list[str]) -> str:
    more = f", ... ({len(items) - _NAMED} more)" if len(items) > _NAMED else ""
    return ", ".join(items[:_NAMED]) + more


def check_hf_tensors(
    reader: SafetensorsReader, expected: Mapping[str, tuple[int, ...]], note: str = ""
) -> None:
    """Every tensor of the folder is one the model reads (``expected``: HF name -> shape, from
    the model's name map) with that shape and a floating-point dtype, and every expected tensor
    is there; otherwise ``WeightsError`` naming the tensors of each kind (``note``: a hint for
    the tensors left over). Only headers are read."""
    entries = reader.entries()
    unused = sorted(
        (n for n in entries if n not in expected and not n.endswith(IGNORED_TENSOR_SUFFIXES)),
        key=_natural,
    )
    missing = [n for n in expected if n not in entries]
    reshaped = [
        f"{n} {entries[n][1]} (the config implies {tuple(shape)})"
        for n, shape in expected.items()
        if n in entries and entries[n][1] != tuple(shape)
    ]
    not_float = [
        f"{n} ({entries[n][0]})"
        for n in expected
        if entries.get(n, ("F32",))[0] not in FLOAT_DTYPES
    ]
    parts = []
    if unused:
        parts.append(f"{len(unused)} tensor(s) the model does not read: {_named(unused)}{note}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing: {_named(missing)}")
    if reshaped:
        parts.append(f"{len(reshaped)} tensor(s) of another shape: {_named(reshaped)}")
    if not_float:
        parts.append(
            f"{len(not_float)} tensor(s) not floating-point: {_named(not_float)}; only "
            f"{', '.join(FLOAT_DTYPES)} weights load (no quantised format, e.g. int8, GPTQ, "
            "AWQ or fp8, is supported: use the unquantised model)"
        )
    if parts:
        raise WeightsError(
            f"{reader.hf_dir}: the weights do not match the model its config.json describes: "
            + "; ".join(parts)
            + ". Fix: use the config.json that came with these weights (or the weights that "
            "belong to this config)"
        )


# --- writing ------------------------------------------------------------------------------------


class StreamingSafetensorsWriter:
    """Writes HF safetensors shards tensor by tensor from a plan of (name, shape, dtype) in order.

    The headers are computed up front from the plan, so each tensor is written to disk as it
    arrives (converted to its planned dtype) and nothing is buffered. One shard is
    ``model.safetensors``; more are ``model-0000k-of-0000n.safetensors`` plus the index file.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ):
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = (
            [HF_SINGLE_FILE]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._expected = [
            (name, shape, dtype, i)
            for i, shard in enumerate(shards)
            for name, shape, dtype, _ in shard
        ]
        self._shards = shards
        self._pos = 0
        self._file: BufferedWriter | None = None
        self._file_idx = -1
        self.total_bytes = sum(nb for shard in shards for *_, nb in shard)

    def _open(self, idx: int) -> BufferedWriter:
        if self._file is not None:
            self._file.close()
        header: dict[str, dict] = {}
        offset = 0
        for name, shape, dtype, nbytes in self._shards[idx]:
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        # "x": a new file only (O_EXCL), so an existing name, a link included, is never reused.
        self._file = open(self.out_dir / self.files[idx], "xb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file_idx = idx
        return self._file

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor of the plan (names must come in plan order)."""
        exp_name, exp_shape, dtype, idx = self._expected[self._pos]
        if name != exp_name or tuple(tensor.shape) != exp_shape:
            raise RuntimeError(
                f"export order: got {name} {tuple(tensor.shape)}, expected {exp_name} {exp_shape}"
            )
        file = self._file if idx == self._file_idx and self._file is not None else self._open(idx)
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
        if data.numel():
            file.write(data.view(torch.uint8).numpy().data)  # a memoryview: no extra copy
        self._pos += 1

    def close(self) -> None:
        """Finish the last file and write the index for sharded output."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pos != len(self._expected):
            raise RuntimeError(f"export incomplete: wrote {self._pos} of {len(self._expected)}")
        if len(self.files) > 1:
            weight_map = {name: self.files[idx] for name, _, _, idx in self._expected}
            with open(self.out_dir / HF_INDEX_FILE, "x") as index:
                index.write(
                    json.dumps(
                        {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                        indent=2,
                    )
                    + "\n"
                )


def write_safetensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    folder: str | os.PathLike,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """(HF name, tensor) pairs as safetensors shards of at most ``max_shard_bytes`` (one tensor
    may exceed it) in ``folder``, in their dtypes, with the index file when there is more than
    one shard; returns the files. The pairs are listed first (their shapes plan the headers);
    each tensor is then copied to the host on its own."""
    named = list(named_tensors)
    writer = StreamingSafetensorsWriter(
        folder, [(name, tuple(t.shape), t.dtype) for name, t in named], max_shard_bytes
    )
    for name, tensor in named:
        writer.write(name, tensor)
    writer.close()
    return [Path(folder) / name for name in writer.files]
