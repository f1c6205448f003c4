"""HF safetensors weight files, streamed: a reader of row ranges and a writer of planned shards.

    reader = SafetensorsReader(hf_dir)                  # single file or sharded with an index
    rows = reader.read("model.embed_tokens.weight", (V, H), rows=slice(a, b))

    writer = StreamingSafetensorsWriter(out_dir, [(name, shape, dtype), ...], max_shard_bytes)
    for name, tensor in tensors: writer.write(name, tensor)   # in plan order, one at a time
    writer.close()                                            # + the index when sharded

    write_safetensors(named_tensors, folder)             # a list of (name, tensor) pairs at once

The reader uses positioned file reads of only the requested rows (no memory map, so resident
memory holds only what is being copied). The writer plans every shard's header from (name,
shape, dtype) up front, so each tensor goes to disk as it arrives and no shard is buffered.
Both the Megatron exporter (``selm_mcore.mcore.weights.export_hf``) and the vLLM weight reload
(``selm_mcore.rollout.vllm_engine``) write through the one writer. No Megatron, no vLLM here.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from io import BufferedWriter
from pathlib import Path

import torch

from selm_mcore.runtime.errors import UserError

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


class WeightsError(UserError, ValueError):
    """HF weights that do not fit the model (missing file or tensor, wrong shape, config)."""


# --- reading ------------------------------------------------------------------------------------


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Reads (row ranges of) tensors from an HF folder's safetensors files, one at a time.

    Reads with plain positioned file reads into fresh buffers instead of memory-mapping the
    files, so resident memory holds only what is being copied (a memory map would keep every
    page touched so far resident until the file is closed).
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = Path(hf_dir)
        self._headers: dict[str, tuple[dict, int]] = {}
        index_path = self.hf_dir / HF_INDEX_FILE
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
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
