"""The Triton kernel, run by the Triton interpreter on CPU, against the plain torch reference.

Not collected by the main pytest run (the name does not start with test_):
test_triton_interpreter.py runs this file in a child pytest process with TRITON_INTERPRET=1,
so the variable never reaches the parent process or other test modules. To run it alone:
    TRITON_INTERPRET=1 .venv/bin/pytest tests/kernels/interpreter_cases.py
Shapes are small (64 tokens x 4,096 vocab) with large blocks: the interpreter is ~1000x slower
than torch and cannot show races.
"""

import os

# triton.jit picks the interpreter when the kernel module is imported, so this comes first.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from selm_mcore.kernels import vocab_parallel_logprobs as triton_module  # noqa: E402
from selm_mcore.kernels.torch_logprobs import (  # noqa: E402
    combine_gathered_stats,
    counted_tokens,
    reference_vocab_parallel_logprobs,
    vocab_shard,
)
from selm_mcore.kernels.vocab_parallel_logprobs import (  # noqa: E402
    TritonVocabParallelLogprobsFunction,
    logprobs_backward,
    logprobs_forward,
    triton_vocab_parallel_logprobs,
)
from selm_mcore.train.logprobs import vocab_parallel_logprobs  # noqa: E402

VOCAB, VOCAB_SIZE = 4096, 4000


@pytest.fixture(autouse=True)
def _require_interpreter():
    if not triton_module.is_interpreted():
        pytest.fail(
            "the kernel module was imported before TRITON_INTERPRET=1 was set; run this "
            "file in its own process (see test_triton_interpreter.py)"
        )


def _upstream(shape, dtype=torch.float32, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_grad_close(actual, expected):
    assert actual.dtype == expected.dtype
    if actual.dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 stores (no round-to-nearest): allow 2 ulps.
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-6, atol=1e-30)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("block", [None, 1024])  # one block per row / a loop over 4 blocks
def test_forward_backward_match_reference(logprob_case, dtype, noncontiguous, block):
    logits, labels, mask = logprob_case(
        vocab=VOCAB, vocab_size=VOCAB_SIZE, dtype=dtype, noncontiguous=noncontiguous
    )
    x = logits.detach().requires_grad_()
    out = triton_vocab_parallel_logprobs(
        x, labels, mask, vocab_size=VOCAB_SIZE, block_fwd=block, block_bwd=block
    )
    ref = reference_vocab_parallel_logprobs(x, labels, mask, vocab_size=VOCAB_SIZE)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out[mask == 0] == 0).all() and out[0, 2] == 0  # masked, ignore_index
    g = _upstream(out.shape)
    (grad,) = torch.autograd.grad(out, x, g)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    _assert_grad_close(grad, ref_grad)
    assert (grad[..., VOCAB_SIZE:] == 0).all() and (grad[mask == 0] == 0).all()


def test_two_dim_input_and_dispatch(logprob_case):
    logits, labels, mask = logprob_case(vocab=VOCAB, vocab_size=VOCAB_SIZE)
    flat = logits.reshape(-1, VOCAB).detach().requires_grad_()
    tokens, seq = vocab_parallel_logprobs(
        flat, labels.reshape(-1), mask.reshape(-1), vocab_size=VOCAB_SIZE, backend="triton"
    )
    ref = reference_vocab_parallel_logprobs(
        flat, labels.reshape(-1), mask.reshape(-1), vocab_size=VOCAB_SIZE
    )
    torch.testing.assert_close(tokens, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq, ref.sum(0, keepdim=True), rtol=1e-5, atol=1e-4)
    g = _upstream(tokens.shape)
    _assert_grad_close(
        torch.autograd.grad(tokens, flat, g)[0], torch.autograd.grad(ref, flat, g)[0]
    )


def test_inplace_backward(logprob_case):
    logits, labels, mask = logprob_case(vocab=VOCAB, vocab_size=VOCAB_SIZE, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    g = _upstream(labels.shape)
    expected = torch.autograd.grad(
        reference_vocab_parallel_logprobs(x, labels, mask, vocab_size=VOCAB_SIZE), x, g
    )[0]
    y = logits.clone().requires_grad_()
    out = triton_vocab_parallel_logprobs(
        y, labels, mask, vocab_size=VOCAB_SIZE, inplace_backward=True
    )
    (grad,) = torch.autograd.grad(out, y, g)
    assert grad.data_ptr() == y.data_ptr()
    _assert_grad_close(grad, expected)


def test_fully_masked_rows_with_nan_upstream(logprob_case):
    logits, labels, _ = logprob_case(vocab=VOCAB)
    mask = torch.zeros(labels.shape)
    mask[0, 0] = 1.0
    x = logits.detach().requires_grad_()
    out = triton_vocab_parallel_logprobs(x, labels, mask)
    assert (out.flatten()[1:] == 0).all() and out[0, 0] < 0
    g = torch.full(out.shape, float("nan"))
    g[0, 0] = 1.0
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
    assert grad[0, 0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size", [VOCAB, VOCAB_SIZE, 1500])
def test_emulated_tp2_matches_reference(logprob_case, dtype, vocab_size):
    """Both vocabulary halves through the kernel, combined as the all-gather would: labels on
    the other rank's slice; vocab_size=1500 leaves rank 1 with padding only. The backward of
    each slice uses only the global lse, as in a real TP run."""
    logits, labels, mask = logprob_case(vocab=VOCAB, vocab_size=vocab_size, dtype=dtype)
    local_vocab = VOCAB // 2
    counted = counted_tokens(labels, mask, vocab_size)
    shards = [vocab_shard(local_vocab, 2, rank, vocab_size) for rank in range(2)]
    parts = [logits[..., r * local_vocab : (r + 1) * local_vocab] for r in range(2)]
    results = [logprobs_forward(p, labels, counted, s, 1024) for p, s in zip(parts, shards)]
    gathered = torch.stack([stats for stats, _ in results])  # what the all-gather returns
    out, lse = combine_gathered_stats(gathered, counted.view(-1))
    x = logits.detach().requires_grad_()
    ref = reference_vocab_parallel_logprobs(x, labels, mask, vocab_size=vocab_size)
    torch.testing.assert_close(out.view(labels.shape), ref, rtol=1e-5, atol=1e-5)
    g = _upstream(labels.shape)
    grads = [
        logprobs_backward(p, g, lse, local_label, s.num_valid_cols, block_v=1024)
        for p, s, (_, local_label) in zip(parts, shards, results)
    ]
    _assert_grad_close(torch.cat(grads, dim=-1), torch.autograd.grad(ref, x, g)[0])


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 16, dtype=torch.float64, generator=gen).requires_grad_()
    labels = torch.tensor([[0, 12, -100], [13, 2, 3]])  # 13 is a padded id (vocab_size 13)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])

    def fn(x):
        return TritonVocabParallelLogprobsFunction.apply(x, labels, mask, None, 13, False, 8, 8)

    assert torch.autograd.gradcheck(fn, (logits,))


def test_saves_8_bytes_per_token(logprob_case):
    from selm_mcore.kernels.bench_logprobs import saved_bytes_for_backward

    logits, labels, mask = logprob_case(vocab=VOCAB, dtype=torch.bfloat16)
    x = logits.detach().requires_grad_()
    saved = saved_bytes_for_backward(
        lambda: triton_vocab_parallel_logprobs(x, labels, mask), [logits, labels, mask]
    )
    assert saved == 8 * labels.numel()


def test_row_offsets_beyond_int32():
    """Row 1 starts 2**31 elements into a 4 GiB virtual buffer (never touched but that row)."""
    vocab = 1024
    storage = torch.empty(2**31 + vocab, dtype=torch.bfloat16)
    logits = storage.as_strided((2, 1, vocab), (2**31, vocab, 1))
    logits.copy_(4 * torch.randn(2, 1, vocab, generator=torch.Generator().manual_seed(5)))
    labels = torch.tensor([[5], [700]])
    x = logits.detach().requires_grad_()
    out = triton_vocab_parallel_logprobs(x, labels, None)
    dense = logits.clone().requires_grad_()
    ref = reference_vocab_parallel_logprobs(dense, labels, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = _upstream(labels.shape)
    _assert_grad_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, dense, g)[0])
