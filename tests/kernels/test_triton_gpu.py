"""The compiled Triton kernel on a CUDA device against the torch reference (skipped without CUDA).

The same checks as interpreter_cases.py, at GPU sizes: real block sizes and warp counts,
round-to-nearest bf16 stores, and row offsets past 2**31 elements.
"""

import pytest
import torch

from selm_mcore.kernels.torch_logprobs import reference_vocab_parallel_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def triton_module():
    from selm_mcore.kernels import vocab_parallel_logprobs as module

    if module.is_interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernel is not in use")
    return module


def _assert_grad_close(actual, expected):
    if actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-7, atol=1e-30)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_reference_on_gpu(triton_module, logprob_case, dtype, noncontiguous, inplace):
    vocab, vocab_size = 32768, 32000
    logits, labels, mask = logprob_case(
        batch=4, seq=256, vocab=vocab, vocab_size=vocab_size, dtype=dtype
    )
    logits, labels, mask = logits.cuda(), labels.cuda(), mask.cuda()
    if noncontiguous:
        base = torch.zeros(256, 4, 2 * vocab, dtype=dtype, device="cuda")
        view = base.transpose(0, 1)[..., ::2]
        view.copy_(logits)
        logits = view
    ref_x = logits.detach().clone().requires_grad_()
    ref = reference_vocab_parallel_logprobs(ref_x, labels, mask, vocab_size=vocab_size)
    g = torch.randn(labels.shape, device="cuda")
    (ref_grad,) = torch.autograd.grad(ref, ref_x, g)
    x = logits.detach().requires_grad_()
    out = triton_module.triton_vocab_parallel_logprobs(
        x, labels, mask, vocab_size=vocab_size, inplace_backward=inplace
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out, x, g)
    _assert_grad_close(grad, ref_grad)
    assert (grad[..., vocab_size:] == 0).all() and (grad[mask == 0] == 0).all()
    if inplace:
        assert grad.data_ptr() == x.data_ptr()


def test_row_offsets_beyond_int32_on_gpu(triton_module):
    tokens, vocab = 16400, 131072  # 2.15e9 elements: the last rows start past 2**31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~12 GiB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, generator=gen)
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    mask = torch.zeros(tokens, device="cuda")
    mask[-8:] = 1.0  # only rows past the int32 limit count
    x = logits.detach().requires_grad_()
    out = triton_module.triton_vocab_parallel_logprobs(x, labels, mask, inplace_backward=True)
    tail = logits[-8:].detach().clone().requires_grad_()
    ref = reference_vocab_parallel_logprobs(tail, labels[-8:], None)
    torch.testing.assert_close(out[-8:], ref, rtol=1e-5, atol=1e-5)
    assert (out[:-8] == 0).all()
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    (ref_grad,) = torch.autograd.grad(ref, tail, torch.ones_like(ref))
    _assert_grad_close(grad[-8:], ref_grad)
    assert (grad[0] == 0).all()
