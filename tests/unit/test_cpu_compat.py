"""The CPU compatibility layer for megatron-core: the private names it patches still exist
(fails loudly when megatron-core moves them), and each replacement behaves like what it
replaces, checked against plain torch. Nothing here calls apply(): the pytest process stays
unpatched (the dist tests run the patched stack in their own processes)."""
import pytest
import torch

from selm_mcore import cpu_compat


def test_patch_targets_exist_in_installed_megatron():
    import megatron.core

    assert megatron.core.__version__ == cpu_compat.MEGATRON_CORE_VERSION, (
        "cpu_compat targets megatron-core " + cpu_compat.MEGATRON_CORE_VERSION)
    cpu_compat.check_patch_targets()


def test_missing_private_name_is_reported(monkeypatch):
    from megatron.core.transformer import utils as mutils

    monkeypatch.delattr(mutils, "get_default_causal_mask")
    with pytest.raises(RuntimeError, match="megatron.core.transformer.utils."
                                           "get_default_causal_mask"):
        cpu_compat.check_patch_targets()


def test_cpu_rng_tracker_forks_named_streams():
    tracker = cpu_compat._cpu_tracker_class()()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(7)
    expected_default = torch.rand(5)
    torch.manual_seed(7)
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    default = torch.rand(5)  # the default stream continues as if fork() never happened
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(first, torch.rand(3)) and torch.equal(second, torch.rand(3))
    assert torch.equal(default, expected_default)
    with pytest.raises(RuntimeError, match="seed 123 already exists"):
        tracker.add("other", 123)
    with pytest.raises(RuntimeError, match="not added"):
        with tracker.fork("missing"):
            pass


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


def test_cpu_replacements():
    mask = cpu_compat._cpu_default_causal_mask(4)
    assert torch.equal(mask, torch.ones(4, 4).triu(1).bool())
    assert cpu_compat._cpu_current_device() == torch.device("cpu")
    state = torch.get_rng_state()
    assert torch.equal(cpu_compat._cpu_get_rng_state(), state)
    torch.rand(3)
    cpu_compat._cpu_set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_apply_is_a_noop_with_cuda():
    assert cpu_compat.apply() is False
    assert not cpu_compat.is_applied()
