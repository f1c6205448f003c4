"""Per-token and per-sequence log-probs of labels from (vocab-parallel) logits: the dispatch.

Shape legend: B batch, T tokens, V vocabulary (padded), V/tp columns per tensor-parallel rank.

``vocab_parallel_logprobs`` is what the reference pass and the trainer call on the output of
Megatron's GPTModel (``parallel_output=True``: this rank's vocabulary slice). It picks an
implementation from ``selm_mcore.kernels``:

- ``"triton"``: the fused Triton kernel (CUDA tensors; CPU tensors only under the Triton
  interpreter, TRITON_INTERPRET=1 set before the kernel module is imported, as the tests do);
- ``"chunked"``: the memory-lean chunked torch path (any device);
- ``"torch"``: the plain reference (gathers the whole vocabulary; tests and debugging);
- ``"auto"`` (default): Triton for CUDA tensors, chunked torch otherwise.

All of them make one all-gather over ``tp_group`` of 3 numbers per token in forward and need
no collective in backward. Conventions (see selm_mcore.kernels.torch_logprobs): a token counts
iff loss_mask != 0 and its label != ignore_index (-100); padded columns >= vocab_size are
excluded from the softmax (parity with HF).
"""

from __future__ import annotations

import torch

from selm_mcore.kernels.torch_logprobs import (
    IGNORE_INDEX,
    chunked_vocab_parallel_logprobs,
    reference_vocab_parallel_logprobs,
    tp_size_rank,
    vocab_shard,
)

BACKENDS = ("auto", "triton", "chunked", "torch")


def _triton_impl(logits: torch.Tensor):
    try:
        from selm_mcore.kernels import vocab_parallel_logprobs as triton_kernels
    except ImportError as exc:
        raise ImportError(
            "backend='triton' needs the triton package: pip install 'selm-mcore[gpu]' "
            "(or [cpu] for the interpreter)"
        ) from exc
    if not logits.is_cuda and not triton_kernels.is_interpreted():
        raise ValueError(
            f"backend='triton' got logits on {logits.device}, but Triton runs CPU tensors only "
            "in its interpreter: set TRITON_INTERPRET=1 before importing "
            "selm_mcore.kernels.vocab_parallel_logprobs, or use backend='chunked'"
        )
    return triton_kernels.triton_vocab_parallel_logprobs


def _check_labels(labels, loss_mask, vocab_size):
    """Counted tokens need a label in [0, vocab_size); reports the first offender."""
    counted = labels != IGNORE_INDEX
    if loss_mask is not None:
        counted &= loss_mask != 0
    bad = counted & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"labels{list(index)} = {int(labels[index])} is outside the vocabulary "
            f"[0, {vocab_size}) on a token with loss_mask != 0: use {IGNORE_INDEX} or "
            "loss_mask = 0 for tokens without a target, or pass the right vocab_size"
        )


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
    *,
    tp_group=None,
    vocab_size: int | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and sequence log-probs of ``labels`` under ``logits``.

    Args:
        logits: [B, T, V/tp] (Megatron's parallel_output=True layout) or [N, V/tp]; bf16, fp16
            or fp32; any strides (sequence-first [T, B, V/tp] goes in as .transpose(0, 1), no
            copy). This rank holds global columns [tp_rank*V/tp, (tp_rank+1)*V/tp).
        labels: global vocabulary ids, shape logits.shape[:-1].
        loss_mask: same shape, nonzero = counted, or None (all counted).
        tp_group: the tensor-parallel process group, None for TP=1.
        vocab_size: the true vocabulary; padded columns >= vocab_size are excluded (HF parity).
            None = every column is a real token.
        backend: "auto" (Triton on CUDA, chunked torch elsewhere), "triton", "chunked", "torch".
        inplace_backward: write the logits' gradient into the logits buffer; only when the
            caller guarantees nothing else reads the logits after this call (not used by
            backend="torch").
        check_labels: raise on counted labels outside [0, vocab_size) (one host sync).

    Returns:
        token_logps fp32 shaped like labels (0 where not counted) and seq_logps fp32 [B]
        (their sum over T; shape [1] for 2-D input). Both are differentiable w.r.t. logits.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    shard = vocab_shard(logits.shape[-1], *tp_size_rank(tp_group), vocab_size)
    if check_labels and labels.shape == logits.shape[:-1]:
        _check_labels(labels, loss_mask, shard.vocab_size)
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "chunked"
    kwargs = dict(tp_group=tp_group, vocab_size=vocab_size)
    if backend == "triton":
        token_logps = _triton_impl(logits)(
            logits, labels, loss_mask, inplace_backward=inplace_backward, **kwargs
        )
    elif backend == "chunked":
        token_logps = chunked_vocab_parallel_logprobs(
            logits, labels, loss_mask, inplace_backward=inplace_backward, **kwargs
        )
    else:
        token_logps = reference_vocab_parallel_logprobs(logits, labels, loss_mask, **kwargs)
    seq_logps = token_logps.sum(-1) if token_logps.dim() == 2 else token_logps.sum(0, keepdim=True)
    return token_logps, seq_logps
