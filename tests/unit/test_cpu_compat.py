"""The CPU compatibility layer for megatron-core, in this (unpatched) process: the private
Megatron names it patches still exist (fails loudly when megatron-core moves them) and
``CudaToCpuMode`` behaves like the CUDA calls it replaces. Nothing here calls apply(): the pytest
process stays unpatched; the patched stack (the RNG tracker, the causal mask, current_device,
the RNG state hooks) is checked through Megatron's own functions in a worker process by
tests/dist/test_cpu_compat_applied.py."""

import pytest
import torch

from selm_mcore.mcore import cpu_compat


def test_patch_targets_exist_in_installed_megatron():
    import megatron.core

    assert megatron.core.__version__ == cpu_compat.MEGATRON_CORE_VERSION, (
        "cpu_compat targets megatron-core " + cpu_compat.MEGATRON_CORE_VERSION
    )
    cpu_compat.check_patch_targets()


def test_missing_private_name_is_reported(monkeypatch):
    from megatron.core.transformer import utils as mutils

    monkeypatch.delattr(mutils, "get_default_causal_mask")
    with pytest.raises(
        RuntimeError, match="megatron.core.transformer.utils.get_default_causal_mask"
    ):
        cpu_compat.check_patch_targets()


def test_cuda_to_cpu_mode():
    with cpu_compat.CudaToCpuMode():
        zeros = torch.zeros([], dtype=torch.int, device="cuda")
        ones = torch.ones(2, 2, device=torch.device("cuda", 0))
        moved = torch.arange(3).cuda()
        to = torch.arange(3).to("cuda:0", torch.float32)
        name = torch.ones(2).type()
        cast = torch.ones(2).type(torch.float64)
    assert zeros.device.type == ones.device.type == moved.device.type == to.device.type == "cpu"
    assert to.dtype == torch.float32 and name == "torch.cuda.FloatTensor"
    assert cast.dtype == torch.float64
    assert torch.ones(2).type() == "torch.FloatTensor"  # outside the mode: unchanged


def test_this_process_stays_unpatched():
    if torch.cuda.is_available():
        pytest.skip("with CUDA apply() is a no-op anyway")
    assert not cpu_compat.is_applied()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()  # the real one: no CUDA here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_apply_is_a_noop_with_cuda():
    assert cpu_compat.apply() is False
    assert not cpu_compat.is_applied()
