"""The torch log-prob paths and the dispatch, against the plain torch reference (CPU, 1 process).

The reference itself is checked against a direct float64 computation. The Triton kernel is
tested in test_triton_interpreter.py; TP=2 over gloo in tests/dist/test_logprobs_tp.py.
"""

import pytest
import torch

from selm_mcore.kernels.torch_logprobs import (
    ChunkedVocabParallelLogprobsFunction,
    chunked_token_stats,
    chunked_vocab_parallel_logprobs,
    combine_gathered_stats,
    counted_tokens,
    local_label_columns,
    reference_vocab_parallel_logprobs,
    vocab_shard,
)
from selm_mcore.train.logprobs import vocab_parallel_logprobs

VOCAB, VOCAB_SIZE = 4096, 4000


def _grad(out, x, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, x, g)
    return grad


def _assert_bf16_grad_close(actual, expected):
    # Both are fp32 gradients rounded to bf16 once; allow 2 ulps of the value.
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-6, atol=1e-30)


def test_reference_matches_direct_float64(logprob_case):
    logits, labels, mask = logprob_case(vocab=VOCAB, vocab_size=VOCAB_SIZE)
    out = reference_vocab_parallel_logprobs(logits, labels, mask, vocab_size=VOCAB_SIZE)
    x = logits.double()[..., :VOCAB_SIZE]
    for b, t in [(0, 0), (0, 1), (1, 5), (2, 7)]:
        if mask[b, t] and 0 <= labels[b, t] < VOCAB_SIZE:
            expected = x[b, t, labels[b, t]] - torch.logsumexp(x[b, t], 0)
            assert out[b, t].item() == pytest.approx(expected.item(), abs=1e-4)
    assert out[0, 2] == 0 and (out[-1] == 0).all() and (out[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_chunked_matches_reference(logprob_case, dtype, noncontiguous):
    logits, labels, mask = logprob_case(
        vocab=VOCAB, vocab_size=VOCAB_SIZE, dtype=dtype, noncontiguous=noncontiguous
    )
    x = logits.detach().requires_grad_()
    ref = reference_vocab_parallel_logprobs(x, labels, mask, vocab_size=VOCAB_SIZE)
    # 5 tokens per chunk: several chunks per sequence and a short tail chunk.
    out = chunked_vocab_parallel_logprobs(
        x, labels, mask, vocab_size=VOCAB_SIZE, chunk_bytes=5 * 4 * VOCAB
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad, ref_grad = _grad(out, x), _grad(ref, x)
    assert grad.dtype == dtype and (grad[..., VOCAB_SIZE:] == 0).all()
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    else:
        _assert_bf16_grad_close(grad, ref_grad)
    assert (grad[mask == 0] == 0).all()


def test_chunked_two_dim_input(logprob_case):
    logits, labels, mask = logprob_case(vocab=512, vocab_size=500)
    flat = logits.reshape(-1, 512).detach().requires_grad_()
    flat_labels, flat_mask = labels.reshape(-1), mask.reshape(-1)
    out = chunked_vocab_parallel_logprobs(flat, flat_labels, flat_mask, vocab_size=500)
    ref = reference_vocab_parallel_logprobs(flat, flat_labels, flat_mask, vocab_size=500)
    assert out.shape == labels.reshape(-1).shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_grad(out, flat), _grad(ref, flat), rtol=1e-5, atol=1e-5)


def test_chunked_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, generator=gen).requires_grad_()
    labels = torch.tensor([[0, 5, -100], [6, 2, 3]])  # 6 is a padded id (vocab_size 6)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])

    def fn(x):
        return ChunkedVocabParallelLogprobsFunction.apply(x, labels, mask, None, 6, False, 8 * 7)

    assert torch.autograd.gradcheck(fn, (logits,))


def test_chunked_inplace_backward_writes_into_logits(logprob_case):
    logits, labels, mask = logprob_case(vocab=VOCAB, vocab_size=VOCAB_SIZE)
    x = logits.clone().requires_grad_()
    expected = _grad(reference_vocab_parallel_logprobs(x, labels, mask, vocab_size=VOCAB_SIZE), x)
    y = logits.clone().requires_grad_()
    grad = _grad(
        chunked_vocab_parallel_logprobs(
            y, labels, mask, vocab_size=VOCAB_SIZE, inplace_backward=True
        ),
        y,
    )
    assert grad.data_ptr() == y.data_ptr()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_zero_even_with_nan_upstream(logprob_case):
    logits, labels, _ = logprob_case(vocab=256)
    x = logits.detach().requires_grad_()
    mask = torch.zeros(labels.shape)
    out = chunked_vocab_parallel_logprobs(x, labels, mask)
    assert (out == 0).all()
    (grad,) = torch.autograd.grad(out, x, torch.full(out.shape, float("nan")))
    assert (grad == 0).all()


@pytest.mark.parametrize("vocab_size", [VOCAB, VOCAB_SIZE, 1500])
def test_emulated_tp2_stats_combine_to_reference(logprob_case, vocab_size):
    """Each half of the vocabulary alone, combined as the all-gather would: labels land on the
    other rank's slice, and with vocab_size=1500 rank 1 holds only padding."""
    logits, labels, mask = logprob_case(vocab=VOCAB, vocab_size=vocab_size)
    local_vocab = VOCAB // 2
    stats = []
    for rank in range(2):
        shard = vocab_shard(local_vocab, 2, rank, vocab_size)
        counted = counted_tokens(labels, mask, vocab_size)
        part = logits[..., rank * local_vocab : (rank + 1) * local_vocab]
        local = local_label_columns(labels, counted, shard)
        stats.append(chunked_token_stats(part, local, shard, rows=7))
    out, _ = combine_gathered_stats(torch.stack(stats), counted.view(-1))
    ref = reference_vocab_parallel_logprobs(logits, labels, mask, vocab_size=vocab_size)
    torch.testing.assert_close(out.view(labels.shape), ref, rtol=1e-5, atol=1e-5)


def test_dispatch_returns_token_and_sequence_sums(logprob_case):
    logits, labels, mask = logprob_case(vocab=VOCAB, vocab_size=VOCAB_SIZE)
    token_logps, seq_logps = vocab_parallel_logprobs(logits, labels, mask, vocab_size=VOCAB_SIZE)
    ref = reference_vocab_parallel_logprobs(logits, labels, mask, vocab_size=VOCAB_SIZE)
    torch.testing.assert_close(token_logps, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq_logps, ref.sum(-1), rtol=1e-5, atol=1e-4)
    assert seq_logps.shape == (labels.shape[0],) and seq_logps[-1] == 0
    ref_tokens, ref_seqs = vocab_parallel_logprobs(
        logits, labels, mask, vocab_size=VOCAB_SIZE, backend="torch"
    )
    torch.testing.assert_close(ref_tokens, ref)
    flat_tokens, flat_seq = vocab_parallel_logprobs(
        logits[0], labels[0], mask[0], vocab_size=VOCAB_SIZE
    )
    assert flat_seq.shape == (1,)
    assert flat_seq.item() == pytest.approx(seq_logps[0].item(), rel=1e-5)


def test_dispatch_rejects_bad_inputs(logprob_case):
    logits, labels, mask = logprob_case(vocab=64, vocab_size=60)
    bad = labels.clone()
    bad[1, 3], mask[1, 3] = 61, 1.0
    outside = r"labels\[1, 3\] = 61 is outside the vocabulary \[0, 60\)"
    with pytest.raises(ValueError, match=outside):
        vocab_parallel_logprobs(logits, bad, mask, vocab_size=60)
    mask[1, 3] = 0.0  # the same label on a masked token is fine
    vocab_parallel_logprobs(logits, bad, mask, vocab_size=60)
    with pytest.raises(ValueError, match="vocab_size=65 must be in"):
        vocab_parallel_logprobs(logits, labels, mask, vocab_size=65)
    with pytest.raises(ValueError, match="backend='cuda' must be one of"):
        vocab_parallel_logprobs(logits, labels, mask, backend="cuda")
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_logprobs(logits, labels[:, :-1], None)


def test_dispatch_refuses_triton_on_cpu_without_interpreter(logprob_case):
    from selm_mcore.kernels import vocab_parallel_logprobs as triton_module

    if triton_module.is_interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set for this whole pytest process")
    logits, labels, mask = logprob_case(vocab=64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        vocab_parallel_logprobs(logits, labels, mask, backend="triton")


def test_chunked_saves_8_bytes_per_token(logprob_case):
    from selm_mcore.kernels.bench_logprobs import saved_bytes_for_backward

    logits, labels, mask = logprob_case(vocab=1024, batch=2, seq=64)
    x = logits.detach().requires_grad_()
    saved = saved_bytes_for_backward(
        lambda: chunked_vocab_parallel_logprobs(x, labels, mask), [logits, labels, mask]
    )
    assert saved == 8 * labels.numel()
    naive = saved_bytes_for_backward(
        lambda: reference_vocab_parallel_logprobs(x, labels, mask), [logits, labels, mask]
    )
    assert naive >= 4 * logits.numel()  # the fp32 log-softmax: the meter sees real tensors
