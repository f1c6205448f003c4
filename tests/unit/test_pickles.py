"""Weights saved by ``torch.save`` read without torch.load (selm_mcore/runtime/pickles.py).

The reference is torch's own ``torch.load(weights_only=True)`` of the same file: every tensor
equal in dtype, shape, strides and values, views of one storage still sharing it (tied
weights). A payload in the pickle is refused naming the file and the global, even with
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, and never runs; so is a pickle that is not a state
dict. The ranker reading such a file through ``selm rank``: tests/e2e/test_ranking.py.
"""

from collections import OrderedDict

import pytest
import torch
from payloads import FORBIDDEN, TouchOnUnpickle

from selm_mcore.runtime.pickles import UnsafePickleError, load_torch_weights


def state_dict_of_every_kind() -> "OrderedDict[str, torch.Tensor]":
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=generator)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    state["embed.weight"] = base
    state["lm_head.weight"] = base  # tied: the same tensor under two names
    state["transposed"] = base.t()  # another view of the same storage, other strides
    state["row"] = base[2]  # a view at an offset
    state["param"] = torch.nn.Parameter(torch.randn(3, generator=generator))
    state["empty"] = torch.zeros(0, 5)
    state["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8):
        state[f"as_{dtype}".replace("torch.", "")] = (torch.arange(12) * 7 % 11).to(dtype)
    state["mask"] = torch.tensor([True, False, True])
    return state


def test_weights_read_back_as_torch_load_reads_them(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state_dict_of_every_kind(), path)
    want = torch.load(path, weights_only=True)
    got = load_torch_weights(path)
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert got[name].stride() == tensor.stride(), name
        assert torch.equal(got[name], tensor), name
    # Views of one storage share it, as torch.load gives them.
    assert got["embed.weight"].data_ptr() == got["lm_head.weight"].data_ptr()
    got["embed.weight"][0, 0] = 100.0
    assert got["transposed"][0, 0] == 100.0


def test_a_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "extra": TouchOnUnpickle(marker)}, path)
    with pytest.raises(UnsafePickleError) as info:
        load_torch_weights(path)
    assert str(info.value).startswith(f"{path}: refusing to unpickle the global {FORBIDDEN}")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content", [[torch.ones(2)], {"nested": {"w": torch.ones(2)}}, {"w": 1.0}, {3: torch.ones(2)}]
)
def test_anything_but_a_flat_state_dict_is_refused(tmp_path, content):
    path = tmp_path / "weights.bin"
    torch.save(content, path)
    with pytest.raises(UnsafePickleError, match=f"{path} does not hold a flat mapping"):
        load_torch_weights(path)


def test_a_file_that_is_not_a_torch_archive_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04K\x01.")  # a bare pickle, not torch's zip format
    with pytest.raises(UnsafePickleError, match="is not a torch zip archive"):
        load_torch_weights(path)
