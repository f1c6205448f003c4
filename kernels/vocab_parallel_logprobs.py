"""Fused vocab-parallel logits -> label log-probs in Triton (forward and backward).

Shape legend: B batch, T tokens per sequence, N = B*T tokens, Vp = this rank's vocabulary
columns (V / tp, padding included).

Layout (Liger-Kernel's one-file shape): private @triton.jit kernels, host launchers, the
torch.autograd.Function, the public function ``triton_vocab_parallel_logprobs``.

Forward: one program per token reads its row of logits once (online max and sum-exp in fp32
from bf16/fp32 loads; the label logit is one extra scalar load). At TP=1 the kernel finishes
the log-prob itself. At TP>1 it writes (max, sum-exp, label logit) per token, the ranks
exchange them with ONE all-gather (12 bytes/token/rank) and combine them in torch; the
vocabulary is never gathered. Saved for backward: the log-sum-exp (fp32) and the label's local
column (int32), 8 bytes/token, plus a reference to the logits (no copy).

Backward: local given the global log-sum-exp; one read of the logits and one write of the
gradient g * (onehot(label) - exp(x - lse)), computed in fp32 and rounded once at the store.
With ``inplace_backward=True`` the gradient overwrites the logits buffer (only when the caller
knows nothing else needs the logits). Tokens that do not count (loss mask 0, ignore_index,
fully masked rows) skip their logits reads and give log-prob 0 and gradient 0. Padded vocab
columns (>= vocab_size) are excluded (parity with HF; see torch_logprobs for the conventions
shared with the torch paths). Offsets are int64; any logits strides are accepted.

On CPU this module only runs under the Triton interpreter: set TRITON_INTERPRET=1 before this
module is imported (``triton.jit`` picks the interpreter at decoration time). Tests:
``.venv/bin/pytest tests/kernels``; benchmark: ``python -m selm_mcore.kernels.bench_logprobs``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from selm_mcore.kernels.torch_logprobs import (
    VocabShard,
    accumulate_dtype,
    as_batched,
    combine_token_stats,
    counted_tokens,
    tp_size_rank,
    vocab_shard,
)

_MAX_BLOCK_FWD = 8192
_MAX_BLOCK_BWD = 4096


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,  # int64 [N], global ids
    counted_ptr,  # uint8 [N]
    local_label_ptr,  # int32 [N] out: label column in this slice or -1
    stats_ptr,  # [3, N] out (TP > 1): max, sum exp(x - max), label logit
    logp_ptr,  # [N] out (TP == 1)
    lse_ptr,  # [N] out (TP == 1): log-sum-exp, +inf where not counted
    n_rows,
    seq_len,
    stride_b,
    stride_t,
    stride_v,
    vocab_start,
    num_valid_cols,
    SINGLE_RANK: tl.constexpr,
    VOCAB_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row - b * seq_len
    row_ptr = logits_ptr + b * stride_b + t * stride_t

    counted = tl.load(counted_ptr + row) != 0
    local_label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
    in_slice = counted & (local_label >= 0) & (local_label < num_valid_cols)
    safe_label = tl.where(in_slice, local_label, 0)
    label_logit = tl.load(row_ptr + safe_label * stride_v, mask=in_slice, other=0.0).to(ACC_DTYPE)

    # Tokens that do not count skip the row: no logits traffic for prompts and padding.
    row_cols = tl.where(counted, num_valid_cols, 0)
    # Online softmax: a scalar running max (one block reduction per step) and per-lane
    # running sums (one exp per element; reduced once after the loop).
    running_max = tl.full([], float("-inf"), dtype=ACC_DTYPE)
    lane_sums = tl.zeros([BLOCK_V], dtype=ACC_DTYPE)
    for start in range(0, row_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        if VOCAB_CONTIGUOUS:
            offsets = cols
        else:
            offsets = cols.to(tl.int64) * stride_v
        x = tl.load(row_ptr + offsets, mask=cols < row_cols, other=float("-inf")).to(ACC_DTYPE)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # A block of -inf logits keeps the max at -inf: shift by 0 instead of -inf - -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_sums = lane_sums * tl.exp(running_max - shift) + tl.exp(x - shift)
        running_max = new_max
    running_sum = tl.sum(lane_sums, axis=0)

    tl.store(local_label_ptr + row, tl.where(in_slice, local_label, -1).to(tl.int32))
    if SINGLE_RANK:
        safe_max = tl.where(running_max == float("-inf"), 0.0, running_max)
        log_sum = tl.log(tl.where(counted, running_sum, 1.0))
        tl.store(logp_ptr + row, tl.where(counted, (label_logit - safe_max) - log_sum, 0.0))
        tl.store(lse_ptr + row, tl.where(counted, safe_max + log_sum, float("inf")))
    else:
        tl.store(stats_ptr + row, running_max)
        tl.store(stats_ptr + n_rows + row, running_sum)
        tl.store(stats_ptr + 2 * n_rows + row, label_logit)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    grad_ptr,  # may alias logits_ptr (in-place backward): each element is read, then written
    grad_out_ptr,  # [N] upstream gradient of the token log-probs
    lse_ptr,  # [N], +inf where not counted
    local_label_ptr,  # int32 [N]
    seq_len,
    stride_b,
    stride_t,
    stride_v,
    grad_stride_b,
    grad_stride_t,
    grad_stride_v,
    local_vocab,
    num_valid_cols,
    VOCAB_CONTIGUOUS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    b = row // seq_len
    t = row - b * seq_len

    lse = tl.load(lse_ptr + row).to(ACC_DTYPE)
    counted = lse != float("inf")
    local_label = tl.load(local_label_ptr + row)
    # Zero for uncounted tokens, so an inf/nan upstream gradient there cannot leak.
    grad_out = tl.where(counted, tl.load(grad_out_ptr + row).to(ACC_DTYPE), 0.0)
    safe_lse = tl.where(counted, lse, 0.0)

    if VOCAB_CONTIGUOUS:
        offsets = cols
        grad_offsets = cols
    else:
        offsets = cols.to(tl.int64) * stride_v
        grad_offsets = cols.to(tl.int64) * grad_stride_v
    # Padded columns and uncounted rows load -inf (no memory traffic) and get gradient 0.
    load_mask = cols < tl.where(counted, num_valid_cols, 0)
    x = tl.load(
        logits_ptr + b * stride_b + t * stride_t + offsets, mask=load_mask, other=float("-inf")
    ).to(ACC_DTYPE)
    prob = tl.exp(x - safe_lse)
    onehot = tl.where(cols == local_label, 1.0, 0.0)
    grad = grad_out * (onehot - prob)
    grad_row_ptr = grad_ptr + b * grad_stride_b + t * grad_stride_t
    tl.store(
        grad_row_ptr + grad_offsets, grad.to(grad_ptr.dtype.element_ty), mask=cols < local_vocab
    )


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_config(block_v: int, max_block: int) -> tuple[int, int]:
    block_v = min(max_block, block_v)
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    return block_v, num_warps


def logprobs_forward(logits, labels, counted, shard: VocabShard, block_v=None):
    """Launches the forward kernel over this rank's slice.

    logits [B, T, Vp]; labels [B, T] global ids; counted bool [B, T] (see counted_tokens).
    Returns (per_token, local_label int32 [B, T]). per_token is the pair (token log-probs
    [N], lse [N]) when shard.tp_size == 1, else the [3, N] tensor (max, sum-exp, label logit)
    for combine_token_stats.
    """
    batch, seq_len, local_vocab = logits.shape
    n_rows = batch * seq_len
    acc = accumulate_dtype(logits.dtype)
    single_rank = shard.tp_size == 1
    per_token: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    if single_rank:  # separate buffers: backward keeps only lse alive
        token_logps, lse = (torch.empty(n_rows, dtype=acc, device=logits.device) for _ in "ab")
        per_token = (token_logps, lse)
        stats = token_logps  # unused by the kernel
    else:
        per_token = stats = torch.empty(3, n_rows, dtype=acc, device=logits.device)
        token_logps = lse = stats  # unused by the kernel
    local_label = torch.empty(batch, seq_len, dtype=torch.int32, device=logits.device)
    block, num_warps = _launch_config(
        block_v or triton.next_power_of_2(max(shard.num_valid_cols, 1)), _MAX_BLOCK_FWD
    )
    if n_rows > 0:
        _logprobs_fwd_kernel[(n_rows,)](
            logits,
            labels.reshape(-1).long().contiguous(),
            counted.view(torch.uint8),
            local_label,
            stats,
            token_logps,
            lse,
            n_rows,
            seq_len,
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            shard.vocab_start,
            shard.num_valid_cols,
            SINGLE_RANK=single_rank,
            VOCAB_CONTIGUOUS=logits.stride(2) == 1,
            ACC_DTYPE=_tl_dtype(acc),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return per_token, local_label


def logprobs_backward(
    logits, grad_token_logps, lse, local_label, num_valid_cols, *, inplace=False, block_v=None
):
    """Launches the backward kernel; returns the gradient of the logits (same shape/dtype).

    ``num_valid_cols``: local columns below vocab_size (the rest is padding, gradient 0).
    """
    batch, seq_len, local_vocab = logits.shape
    grad = logits if inplace else torch.empty_like(logits)
    n_rows = batch * seq_len
    block, num_warps = _launch_config(
        block_v or triton.next_power_of_2(max(local_vocab, 1)), _MAX_BLOCK_BWD
    )
    if n_rows == 0 or local_vocab == 0:
        return grad
    grad_out = grad_token_logps.reshape(-1).contiguous()
    vocab_contiguous = logits.stride(2) == 1 and grad.stride(2) == 1
    _logprobs_bwd_kernel[(n_rows, triton.cdiv(local_vocab, block))](
        logits,
        grad,
        grad_out,
        lse.reshape(-1).contiguous(),
        local_label.reshape(-1).contiguous(),
        seq_len,
        logits.stride(0),
        logits.stride(1),
        logits.stride(2),
        grad.stride(0),
        grad.stride(1),
        grad.stride(2),
        local_vocab,
        num_valid_cols,
        VOCAB_CONTIGUOUS=vocab_contiguous,
        ACC_DTYPE=_tl_dtype(accumulate_dtype(logits.dtype)),
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return grad


class TritonVocabParallelLogprobsFunction(torch.autograd.Function):
    """Saves the logits (a reference), lse and the local label column: 8 B/token of new memory."""

    @staticmethod
    def forward(
        ctx, logits, labels, loss_mask, tp_group, vocab_size, inplace_backward, block_fwd, block_bwd
    ):
        logits3d, labels3d, mask3d = as_batched(logits, labels, loss_mask)
        shard = vocab_shard(logits3d.shape[-1], *tp_size_rank(tp_group), vocab_size)
        counted = counted_tokens(labels3d, mask3d, shard.vocab_size)
        per_token, local_label = logprobs_forward(logits3d, labels3d, counted, shard, block_fwd)
        if shard.tp_size == 1:
            token_logps, lse = per_token
        else:
            token_logps, lse = combine_token_stats(per_token, counted.view(-1), tp_group)
        ctx.save_for_backward(logits3d, lse, local_label)
        ctx.num_valid_cols, ctx.inplace_backward, ctx.block_bwd = (
            shard.num_valid_cols,
            inplace_backward,
            block_bwd,
        )
        ctx.two_dim = labels.dim() == 1
        return token_logps.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_token_logps):
        logits3d, lse, local_label = ctx.saved_tensors
        grad = logprobs_backward(
            logits3d,
            grad_token_logps,
            lse,
            local_label,
            ctx.num_valid_cols,
            inplace=ctx.inplace_backward,
            block_v=ctx.block_bwd,
        )
        if ctx.two_dim:
            grad = grad.squeeze(0)
        return grad, None, None, None, None, None, None, None


def triton_vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    tp_group=None,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
    block_fwd: int | None = None,
    block_bwd: int | None = None,
) -> torch.Tensor:
    """Token log-probs of ``labels`` from this rank's vocab-parallel logits slice (Triton).

    logits [B, T, Vp] or [N, Vp], bf16/fp16/fp32 (fp64 for gradcheck), any strides; labels
    global vocabulary ids shaped like logits.shape[:-1]; loss_mask optional, nonzero = counted.
    Returns fp32 log-probs shaped like labels, 0 where the token does not count.
    ``block_fwd``/``block_bwd`` override the vocabulary block sizes (powers of two).
    """
    return TritonVocabParallelLogprobsFunction.apply(
        logits, labels, loss_mask, tp_group, vocab_size, inplace_backward, block_fwd, block_bwd
    )


def is_interpreted() -> bool:
    """True when this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1)."""
    return not isinstance(_logprobs_fwd_kernel, triton.runtime.jit.JITFunction)
