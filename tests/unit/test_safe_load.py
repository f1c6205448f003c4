"""Dist checkpoint metadata without unrestricted unpickling (selm_mcore/mcore/safe_load.py).

In this process: a crafted ``.metadata`` whose pickle runs ``os.system`` is a working exploit
against torch's own FileSystemReader, and the safe reader refuses it (naming file and global)
before anything runs; so are payloads hidden inside a real Metadata and data paths outside the
folder. Real Megatron checkpoints (model and optimizer) saved, loaded and tampered with:
tests/dist/test_safe_load_checkpoint.py.
"""

import pytest
import torch
from payloads import FORBIDDEN, TouchOnUnpickle, write_pickle

# --- in this process --------------------------------------------------------------------------


def test_malicious_metadata_is_refused_before_it_runs(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from selm_mcore.mcore.safe_load import SafeFileSystemReader, UnsafeCheckpointError

    marker = tmp_path / "pwned"
    metadata = write_pickle(tmp_path / "ckpt" / ".metadata", TouchOnUnpickle(marker))
    # The control: torch's reader (what Megatron uses) executes the payload.
    with pytest.raises(AttributeError):  # os.system returned an int, not a Metadata
        FileSystemReader(tmp_path / "ckpt").read_metadata()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError) as info:
        SafeFileSystemReader(tmp_path / "ckpt").read_metadata()
    assert str(metadata) in str(info.value) and FORBIDDEN in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_metadata_of_any_dtype_reads_back_equal(tmp_path, dtype):
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    from selm_mcore.mcore.safe_load import read_dcp_metadata

    size = torch.Size([4, 3])
    entry = TensorStorageMetadata(
        TensorProperties(dtype=dtype), size, [ChunkStorageMetadata(torch.Size([0, 0]), size)]
    )
    obj = Metadata(state_dict_metadata={"w": entry}, storage_data={})
    assert read_dcp_metadata(write_pickle(tmp_path / ".metadata", obj)) == obj


@pytest.mark.parametrize("where", ["planner_data", "storage_meta.modules", "exec"])
def test_payload_inside_a_real_metadata_is_refused(tmp_path, where):
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    from selm_mcore.mcore.safe_load import UnsafeCheckpointError, read_dcp_metadata

    marker = tmp_path / "pwned"
    payload = TouchOnUnpickle(marker)
    forbidden = FORBIDDEN
    if where == "planner_data":
        obj = Metadata(state_dict_metadata={}, planner_data={"x": payload}, storage_data={})
    elif where == "storage_meta.modules":
        obj = Metadata(
            state_dict_metadata={},
            storage_data={},
            storage_meta=StorageMeta(modules=["a", payload]),
        )
    else:

        class ExecOnUnpickle:
            def __reduce__(self):
                return exec, (f"open({str(marker)!r}, 'w').close()",)

        obj = Metadata(state_dict_metadata={}, planner_data=ExecOnUnpickle(), storage_data={})
        forbidden = "builtins.exec"
    path = write_pickle(tmp_path / ".metadata", obj)
    with pytest.raises(UnsafeCheckpointError, match=forbidden) as info:
        read_dcp_metadata(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("relative", ["../outside.distcp", "/etc/passwd", "sub/__0_0.distcp"])
def test_data_files_outside_the_folder_are_refused(tmp_path, relative):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    from selm_mcore.mcore.safe_load import UnsafeCheckpointError, read_dcp_metadata

    obj = Metadata(
        state_dict_metadata={}, storage_data={MetadataIndex("w"): _StorageInfo(relative, 0, 8)}
    )
    path = write_pickle(tmp_path / ".metadata", obj)
    with pytest.raises(UnsafeCheckpointError, match="plain file names"):
        read_dcp_metadata(path)
