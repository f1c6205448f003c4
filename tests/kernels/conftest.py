"""Shared inputs for the kernel tests in tests/kernels.

Sets no environment variables: the Triton interpreter tests (interpreter_cases.py) run in a
child process started by test_triton_interpreter.py, so TRITON_INTERPRET=1 never reaches the
pytest process or the other test modules.
"""

import pytest
import torch


def make_logprob_case(
    *,
    batch=4,
    seq=16,
    vocab=4096,
    vocab_size=None,
    dtype=torch.float32,
    noncontiguous=False,
    seed=0,
):
    """Logits [B, T, V] plus labels and loss mask that cover the awkward cases.

    - padded columns when vocab_size < vocab (their logits are large, so including them
      in the softmax would show);
    - masked tokens, ignore_index (-100) labels, masked labels inside the padding, the first
      and last real token ids, one row shifted by +100, one row whose max sits in its last
      real column (the running max and sum are rescaled late), one row whose first quarter
      is -inf (a whole block of -inf: the running max stays -inf), and the last sequence
      fully masked;
    - noncontiguous=True: a [T, B, 2V] buffer seen as [B, T, V] with vocab stride 2.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab_size = vocab if vocab_size is None else vocab_size
    if noncontiguous:
        base = (4 * torch.randn(seq, batch, 2 * vocab, generator=gen)).to(dtype)
        logits = base.transpose(0, 1)[..., ::2]
    else:
        logits = (4 * torch.randn(batch, seq, vocab, generator=gen)).to(dtype)
    with torch.no_grad():
        logits[..., vocab_size:] = 30.0
        logits[0, 1] += 100.0
        logits[0, 3, vocab_size - 2] = 60.0
        logits[1, 2, : vocab // 4] = float("-inf")
    labels = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    labels[0, 0], labels[0, 1] = 0, vocab_size - 1
    labels[0, 2] = -100
    loss_mask = (torch.rand(batch, seq, generator=gen) > 0.25).float()
    labels[1, 2] = vocab // 2
    loss_mask[0, :3] = 1.0
    loss_mask[1, 2] = 1.0
    if vocab_size < vocab:
        labels[1, 0], loss_mask[1, 0] = vocab_size, 0.0  # padded id on a masked token
    loss_mask[-1] = 0.0
    return logits, labels, loss_mask


@pytest.fixture
def logprob_case():
    return make_logprob_case
