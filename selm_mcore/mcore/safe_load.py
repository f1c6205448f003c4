"""Load Megatron dist checkpoints (torch_dist) without unpickling arbitrary objects.

    from selm_mcore.mcore.safe_load import load_dist_checkpoint
    state = load_dist_checkpoint(sharded_state_dict, ckpt_dir)   # = dist_checkpointing.load

A torch_dist checkpoint folder holds four kinds of files, read here as follows:

* ``metadata.json``   json (Megatron reads it; nothing to do).
* ``.metadata``       a pickle of torch.distributed.checkpoint's ``Metadata``. torch's
                      ``FileSystemReader.read_metadata`` reads it with plain ``pickle.load``;
                      ``SafeFileSystemReader`` reads it with ``DcpMetadataUnpickler`` (the
                      project's ``runtime.pickles.RestrictedUnpickler``), which
                      resolves only the globals in ``DCP_METADATA_GLOBALS`` (the DCP metadata
                      dataclasses and enums, ``torch.Size``, torch dtypes, torch's layout
                      lookup) and refuses anything else with ``UnsafeCheckpointError`` naming
                      the file and the global. Data file names in it must be bare names inside
                      the folder.
* ``__R_I.distcp``    tensor entries: torch reads them with ``torch.load(weights_only=True)``;
                      bytes entries (Megatron ``ShardedObject``s; selm-mcore's model and
                      optimizer checkpoints have none) would go through the load planner's
                      ``torch.load(weights_only=False)``: ``SafeFileSystemReader.read_data``
                      unpickles them with ``weights_only=True`` first and hands the planner a
                      re-serialised copy of the (tensor/container-only) result.
* ``common.pt``       the non-sharded part: ``WeightsOnlyCommonLoadStrategy`` reads it with
                      ``torch.load(weights_only=True)`` (Megatron's default relies on torch's
                      default, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off).

Megatron-core 0.16.1 builds its reader inside ``TorchDistLoadShardedStrategy.load`` through the
module function ``strategies.torch._get_filesystem_reader`` and offers no argument for it, so
``SafeTorchDistLoadStrategy`` swaps that function for the duration of its own calls only (and
fails loudly if the name moves). Every dist-checkpoint load in selm-mcore goes through
``load_dist_checkpoint``: ``checkpoint.load_model_checkpoint`` and
``checkpoint.load_optimizer_state``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch_strategy
from megatron.core.dist_checkpointing.strategies.common import (
    COMMON_STATE_FNAME,
    TorchCommonLoadStrategy,
)
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from selm_mcore.runtime.errors import UserError
from selm_mcore.runtime.pickles import RestrictedUnpickler

# The globals a torch 2.13 ``.metadata`` file needs, as found by reading real model and
# optimizer checkpoints written by selm-mcore (fp32 and bf16), plus the bytes-entry
# counterparts of the tensor classes (BytesStorageMetadata, BytesIOWriteData) that a checkpoint
# holding Megatron ShardedObjects records. Torch dtypes are allowed by type (see find_class).
DCP_METADATA_GLOBALS = frozenset(
    {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # copyreg reducer of torch.layout: name -> layout
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.planner", "SavePlan"),
        ("torch.distributed.checkpoint.planner", "WriteItem"),
        ("torch.distributed.checkpoint.planner", "WriteItemType"),
        ("torch.distributed.checkpoint.planner", "TensorWriteData"),
        ("torch.distributed.checkpoint.planner", "BytesIOWriteData"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    }
)

_READER_HOOK = "_get_filesystem_reader"  # in megatron.core.dist_checkpointing.strategies.torch


class UnsafeCheckpointError(UserError, CheckpointingException):
    """A checkpoint file asks for an object outside the allow-list; nothing was executed."""


class DcpMetadataUnpickler(RestrictedUnpickler):
    """The project's restricted unpickler (``selm_mcore.runtime.pickles``) resolving only
    ``DCP_METADATA_GLOBALS`` and torch dtypes; a refusal is an ``UnsafeCheckpointError``."""

    def __init__(self, file, *, source: str):
        super().__init__(
            file,
            allowed=DCP_METADATA_GLOBALS,
            source=source,
            why=(
                "a torch.distributed.checkpoint metadata file holds only DCP metadata classes, "
                "torch.Size and dtypes (selm_mcore.mcore.safe_load.DCP_METADATA_GLOBALS). The "
                "file was not written by torch.distributed.checkpoint (or was tampered with); "
                "do not load it, re-create the checkpoint from a source you trust"
            ),
        )

    def refusal(self, module: str, name: str) -> Exception:
        return UnsafeCheckpointError(
            f"{self.source}: refusing to unpickle the global {module}.{name}: {self.why}"
        )


def read_dcp_metadata(path: str | os.PathLike) -> Metadata:
    """The ``Metadata`` pickled in a dist checkpoint's ``.metadata`` file, read safely."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            metadata = DcpMetadataUnpickler(f, source=str(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            exc.add_note(f"while reading the dist-checkpoint metadata file {path}")
            raise
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(
            f"{path} holds a {type(metadata).__name__}, not a torch.distributed.checkpoint Metadata"
        )
    _check_storage_paths(metadata, path)
    return metadata


def _check_storage_paths(metadata: Metadata, path: Path) -> None:
    """Data files named by the metadata must be plain names inside the checkpoint folder."""
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise UnsafeCheckpointError(
            f"{path}: storage_data is a {type(storage).__name__}, "
            "expected a dict of data-file entries"
        )
    for index, info in storage.items():
        relative = getattr(info, "relative_path", None)
        if (
            not isinstance(relative, str)
            or relative in ("", ".", "..")
            or os.path.basename(relative) != relative
            or "\\" in relative
        ):
            raise UnsafeCheckpointError(
                f"{path}: entry {getattr(index, 'fqn', index)!r} points at data file "
                f"{relative!r}; data files must be plain file names inside {path.parent}"
            )


class _WeightsOnlyBytesPlanner:
    """Load-planner proxy: bytes entries are unpickled with ``weights_only=True`` first.

    torch's ``DefaultLoadPlanner.load_bytes`` (inherited by Megatron's ``MCoreLoadPlanner``)
    calls ``torch.load(weights_only=False)``; the planner here only ever sees bytes that
    ``torch.save`` wrote from an object the weights-only unpickler accepted.
    """

    def __init__(self, planner, describe: Callable[[Any], str]):
        self._planner = planner
        self._describe = describe

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{self._describe(read_item)}: refusing a bytes entry that torch.load("
                f"weights_only=True) rejects: {exc}"
            ) from exc
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


class SafeFileSystemReader(FileSystemReader):
    """torch DCP ``FileSystemReader`` with restricted metadata and weights-only bytes entries.

    Caches the metadata it read (as Megatron's CachedMetadataFileSystemReader does), so the
    strategy can read it up front and DCP's own calls reuse it.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._metadata_by_rank: dict[int | None, Metadata] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank not in self._metadata_by_rank:
            metadata = read_dcp_metadata(self._get_metadata_path(rank))
            if metadata.storage_meta is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata_by_rank[rank] = metadata
        return self._metadata_by_rank[rank]

    def read_data(self, plan, planner):
        def describe(read_item) -> str:
            info = self.storage_data[read_item.storage_index]
            return f"{Path(self.path) / info.relative_path} (entry {read_item.storage_index.fqn!r})"

        return super().read_data(plan, _WeightsOnlyBytesPlanner(planner, describe))


@contextlib.contextmanager
def _megatron_reader(factory: Callable[..., FileSystemReader]) -> Iterator[None]:
    """Make Megatron's torch_dist strategy build its reader with ``factory`` (scoped swap)."""
    if not callable(getattr(mcore_torch_strategy, _READER_HOOK, None)):
        raise RuntimeError(
            f"megatron.core.dist_checkpointing.strategies.torch.{_READER_HOOK} is gone: "
            "selm_mcore.mcore.safe_load is written against megatron-core==0.16.1; pin that version "
            "or port the hook (loading without it would unpickle .metadata unrestricted)"
        )
    original = getattr(mcore_torch_strategy, _READER_HOOK)
    setattr(mcore_torch_strategy, _READER_HOOK, factory)
    try:
        yield
    finally:
        setattr(mcore_torch_strategy, _READER_HOOK, original)


def _new_safe_reader(checkpoint_dir, cache_metadata: bool = False) -> SafeFileSystemReader:
    return SafeFileSystemReader(checkpoint_dir)


class SafeTorchDistLoadStrategy(mcore_torch_strategy.TorchDistLoadShardedStrategy):
    """Megatron's torch_dist load strategy reading through ``SafeFileSystemReader``."""

    def load(self, sharded_state_dict, checkpoint_dir):
        reader = SafeFileSystemReader(checkpoint_dir)
        # Read (and vet) the metadata here: inside DCP a failure comes back wrapped per rank.
        reader.read_metadata()
        try:
            with _megatron_reader(lambda *args, **kwargs: reader):
                return super().load(sharded_state_dict, checkpoint_dir)
        except CheckpointException as exc:  # DCP's per-rank wrapper: surface our refusal
            refusals = [
                error
                for error, _ in exc.failures.values()
                if isinstance(error, UnsafeCheckpointError)
            ]
            if refusals:
                raise refusals[0] from None
            raise

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        if metadata is None:
            metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with _megatron_reader(_new_safe_reader):
            return super().load_sharded_metadata(checkpoint_dir)


class WeightsOnlyCommonLoadStrategy(TorchCommonLoadStrategy):
    """Megatron's common-state strategy with ``torch.load(weights_only=True)`` spelled out."""

    def load_common(self, checkpoint_dir):
        load_path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        try:
            return torch.load(load_path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise CheckpointingException(f"Common file {load_path} does not exist") from exc
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{load_path}: refusing what torch.load(weights_only=True) rejects: {exc}"
            ) from exc

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        # Unreachable with SafeTorchDistLoadStrategy (it loads ShardedObjects itself); Megatron's
        # version would torch.load per-object .pt files with torch's default weights_only.
        raise UnsafeCheckpointError(
            f"{checkpoint_dir}: per-object .pt files are not loaded by selm_mcore.mcore.safe_load"
        )


def load_dist_checkpoint(
    sharded_state_dict: dict, checkpoint_dir: str | os.PathLike, **kwargs: Any
):
    """``megatron.core.dist_checkpointing.load`` through the safe strategies above."""
    return dist_checkpointing.load(
        sharded_state_dict,
        str(checkpoint_dir),
        sharded_strategy=SafeTorchDistLoadStrategy(),
        common_strategy=WeightsOnlyCommonLoadStrategy(),
        **kwargs,
    )
