"""Unpickling that runs nothing a file asks for: a restricted unpickler, and a reader of the
weights ``torch.save`` writes (``pytorch_model.bin``) built on it.

    weights = load_torch_weights("ranker/pytorch_model.bin")   # {name: tensor}
    obj = RestrictedUnpickler(f, allowed={("torch", "Size")}, source="x.pkl", why="...").load()

Pickle can call only what ``find_class`` resolves, so an unpickler that resolves a fixed list of
globals refuses any ``__reduce__`` payload (``os.system``, ``eval``, ``subprocess``...) before it
runs: ``UnsafePickleError`` names the file and the global. ``selm_mcore.mcore.safe_load`` uses
it for Megatron's dist-checkpoint metadata.

``load_torch_weights`` reads torch's zip format (``torch.save`` since torch 1.6): ``data.pkl``
goes through the restricted unpickler with only the tensor rebuild functions, the storage types
and ``collections.OrderedDict`` resolvable, and each storage is read from the archive's
``data/`` records here. ``torch.load`` is never called, so neither its ``weights_only`` default
nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` changes what is allowed. The result must be a flat
mapping of names to tensors.
"""

from __future__ import annotations

import os
import pickle
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selm_mcore.runtime.errors import UserError

# torch.save's storage classes (pickled as torch.<Name>) -> the dtype of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
TORCH_WEIGHTS_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
    }
)


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickle that asks for a global outside the allowed list; nothing of it was run."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the ``allowed`` (module, name) globals (and torch
    dtypes with ``dtypes``); any other global raises ``refusal(module, name)``."""

    def __init__(
        self,
        file,
        *,
        allowed: Iterable[tuple[str, str]],
        source: str,
        why: str,
        dtypes: bool = True,
    ):
        super().__init__(file)
        self.allowed = frozenset(allowed)
        self.source = source
        self.why = why
        self.dtypes = dtypes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return super().find_class(module, name)
        if (
            self.dtypes
            and module == "torch"
            and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        raise self.refusal(module, name)

    def refusal(self, module: str, name: str) -> Exception:
        return UnsafePickleError(
            f"{self.source}: refusing to unpickle the global {module}.{name}: {self.why}"
        )


@dataclass(frozen=True)
class _StorageType:
    """What ``find_class`` gives for ``torch.<Name>Storage``: its name and element dtype (the
    legacy storage class itself is never touched)."""

    name: str
    dtype: torch.dtype


class _TorchWeightsUnpickler(RestrictedUnpickler):
    """Unpickles a torch zip archive's ``data.pkl``; storages come from ``archive``."""

    def __init__(self, file, *, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(
            file,
            allowed=TORCH_WEIGHTS_GLOBALS,
            source=source,
            why=(
                "a weights file holds only tensors (torch._utils._rebuild_tensor_v2, storage "
                "types, OrderedDict). The file was not written by torch.save of a state dict, "
                "or was tampered with: do not load it; get the weights from a source you trust, "
                "preferably as model.safetensors"
            ),
        )
        self.archive = archive
        self.prefix = prefix
        self.storages: dict[str, torch.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> torch.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"{self.source}: unexpected persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self.source}: storage of unknown type {storage_type!r:.200}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            try:
                data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            except KeyError:
                raise UnsafePickleError(f"{self.source}: storage {key!r} is missing") from None
            if len(data) != int(numel) * storage_type.dtype.itemsize:
                raise UnsafePickleError(
                    f"{self.source}: storage {key!r} holds {len(data)} bytes, not {numel} "
                    f"{storage_type.dtype} elements"
                )
            untyped = (
                torch.frombuffer(data, dtype=torch.uint8).untyped_storage()
                if data
                else (torch.UntypedStorage(0))
            )
            self.storages[key] = torch.TypedStorage(
                wrap_storage=untyped, dtype=storage_type.dtype, _internal=True
            )
        return self.storages[key]


def load_torch_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The {name: tensor} state dict in a ``torch.save`` zip archive, read without running
    anything the pickle asks for (module doc). Raises ``UnsafePickleError`` naming the file."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafePickleError(
            f"{path} is not a torch zip archive (the pre-1.6 torch.save format is not read); "
            "save the weights as model.safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UnsafePickleError(f"{path}: expected one data.pkl record, found {len(pickles)}")
        prefix = pickles[0][: -len("/data.pkl")]
        names = set(archive.namelist())
        if f"{prefix}/byteorder" in names:
            order = archive.read(f"{prefix}/byteorder").decode(errors="replace").strip()
            if order != sys.byteorder:
                raise UnsafePickleError(
                    f"{path}: saved {order}-endian, this machine reads {sys.byteorder}"
                )
        with archive.open(pickles[0]) as data:
            state = _TorchWeightsUnpickler(
                data, archive=archive, prefix=prefix, source=str(path)
            ).load()
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnsafePickleError(
            f"{path} does not hold a flat mapping of names to tensors (a state dict)"
        )
    return dict(state)
