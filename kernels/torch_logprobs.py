"""Label log-probs from vocab-parallel logits in plain torch: the reference and the chunked path.

Shape legend: B batch, T tokens per sequence, N = B*T tokens, V = padded vocabulary,
Vp = V / tp (the columns of this tensor-parallel rank).

Two implementations with the same contract as the Triton kernel in
``selm_mcore.kernels.vocab_parallel_logprobs``:

- ``reference_vocab_parallel_logprobs``: the readable reference. Gathers the full vocabulary
  over the TP group, drops padded columns, ``log_softmax`` in fp32 and gathers the label column.
  Memory: several fp32 copies of the logits. Used by tests and the benchmark.
- ``chunked_vocab_parallel_logprobs``: the memory-lean path the package uses where Triton cannot
  run (CPU). It walks the logits in row chunks whose fp32 temporaries stay below ~3% of the
  logits, computes per-token (max, sum-exp, label logit) for this rank's slice, combines the
  ranks with ONE all-gather of those 3 numbers per token, and saves 8 bytes per token for
  backward (log-sum-exp fp32 + local label column int32). Backward is local:
  ``grad = g * (onehot(label) - exp(x - lse))``, optionally written into the logits buffer.

Conventions shared by every implementation (see ``counted_tokens``):

- ``labels`` are global vocabulary ids; rank r owns columns [r*Vp, (r+1)*Vp).
- A token counts iff ``loss_mask != 0`` and ``0 <= label < vocab_size``; ``ignore_index``
  labels (-100) and masked tokens give log-prob 0 and zero gradient.
- ``vocab_size`` is the true vocabulary; padded columns >= vocab_size are excluded from the
  softmax, so results match Hugging Face models (which have no padded columns). Megatron's own
  cross entropy keeps them; with the usual zero-initialised or untrained padding rows the
  difference is log(1 + n_pad * exp(pad_logit - lse)), small but not zero.
- Results are fp32 (fp64 for fp64 logits, which only gradcheck uses).

Run the tests with ``.venv/bin/pytest tests/kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
# Fraction of the logits' bytes the chunked path may use for its fp32 temporaries.
_CHUNK_TEMP_FRACTION = 1 / 32
_DEFAULT_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's logits columns sit in the vocabulary."""

    tp_size: int
    tp_rank: int
    vocab_start: int  # global id of local column 0
    local_vocab: int  # Vp, columns in this tensor (padding included)
    num_valid_cols: int  # local columns < vocab_size (the rest is padding)
    vocab_size: int  # the true vocabulary (global)


def tp_size_rank(tp_group) -> tuple[int, int]:
    """(size, rank) of the TP group; (1, 0) for None."""
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def vocab_shard(local_vocab: int, tp_size: int, tp_rank: int, vocab_size: int | None) -> VocabShard:
    """Rank ``tp_rank``'s vocabulary slice; checks ``vocab_size`` against the padded size."""
    padded_vocab = local_vocab * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, logits.shape[-1] * tp = {local_vocab} * "
            f"{tp_size} = {padded_vocab}]: pass the true (unpadded) vocabulary size of the model"
        )
    vocab_start = tp_rank * local_vocab
    num_valid_cols = min(max(vocab_size - vocab_start, 0), local_vocab)
    return VocabShard(tp_size, tp_rank, vocab_start, local_vocab, num_valid_cols, vocab_size)


def as_batched(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None):
    """Checks shapes; returns 3-D logits [B, T, Vp] (a view), labels and loss_mask as [B, T].

    2-D inputs ([N, Vp] logits, [N] labels) are treated as one sequence (B = 1).
    """
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"logits must be [B, T, V/tp] or [N, V/tp], got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} must equal labels shape "
            f"{tuple(labels.shape)}"
        )
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
        loss_mask = None if loss_mask is None else loss_mask.unsqueeze(0)
    return logits, labels, loss_mask


def counted_tokens(labels: torch.Tensor, loss_mask: torch.Tensor | None, vocab_size: int):
    """Bool [B, T], contiguous: the tokens whose log-prob is computed (all others give 0)."""
    counted = (labels >= 0) & (labels < vocab_size)
    if loss_mask is not None:
        counted &= loss_mask != 0
    return counted.contiguous()


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 maths for bf16/fp16/fp32 logits; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_label_columns(labels: torch.Tensor, counted: torch.Tensor, shard: VocabShard):
    """int32 [B, T]: the label's column in this rank's slice, -1 when elsewhere or not counted."""
    local = labels.long() - shard.vocab_start
    in_slice = counted & (local >= 0) & (local < shard.num_valid_cols)
    return torch.where(in_slice, local, -1).to(torch.int32)


def all_gather_token_stats(stats: torch.Tensor, tp_group) -> torch.Tensor:
    """All-gathers [3, N] per-token stats over the TP group into [tp, 3, N] (one collective)."""
    tp_size = tp_size_rank(tp_group)[0]
    gathered = stats.new_empty(tp_size * stats.numel())
    # Flat 1-D buffers: gloo's all_gather_into_tensor rejects a stacked output shape.
    dist.all_gather_into_tensor(gathered, stats.contiguous().view(-1), group=tp_group)
    return gathered.view(tp_size, *stats.shape)


def combine_gathered_stats(gathered: torch.Tensor, counted: torch.Tensor):
    """Combines every rank's (max, sum-exp, label logit) into token log-probs and log-sum-exp.

    gathered: [tp, 3, N]; per rank the row max over its slice (-inf for an empty slice or an
    uncounted token), sum exp(x - max), and the label logit (0 when the label is elsewhere).
    counted: bool [N]. Returns (token_logps [N], lse [N]); lse is +inf where the token does
    not count, which makes its backward exactly zero.
    """
    rank_max, rank_sumexp, rank_label_logit = gathered.unbind(1)
    row_max = rank_max.amax(0)
    # A fully masked row, or one whose every rank has an empty slice, has max -inf.
    safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sumexp = (rank_sumexp * torch.exp(rank_max - safe_max)).sum(0)
    log_sumexp = torch.log(torch.where(counted, sumexp, 1.0))
    label_logit = rank_label_logit.sum(0)
    token_logps = torch.where(counted, (label_logit - safe_max) - log_sumexp, 0.0)
    lse = torch.where(counted, safe_max + log_sumexp, float("inf"))
    return token_logps, lse


def combine_token_stats(stats: torch.Tensor, counted: torch.Tensor, tp_group):
    """This rank's [3, N] stats -> (token_logps, lse) [N] with ONE all-gather over tp_group."""
    if tp_size_rank(tp_group)[0] > 1:
        return combine_gathered_stats(all_gather_token_stats(stats, tp_group), counted)
    return combine_gathered_stats(stats.unsqueeze(0), counted)


class _GatherVocab(torch.autograd.Function):
    """All-gather of the vocabulary dim; backward keeps this rank's slice (the loss is
    replicated on every TP rank, so gradients must not be summed over ranks)."""

    @staticmethod
    def forward(ctx, logits, tp_group):
        ctx.tp_group = tp_group
        ctx.local_vocab = logits.shape[-1]
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, logits.contiguous(), group=tp_group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = dist.get_rank(ctx.tp_group) * ctx.local_vocab
        return grad[..., start : start + ctx.local_vocab], None


def reference_vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    tp_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Plain torch reference: gather the vocabulary, log_softmax in fp32, gather the label.

    Returns token log-probs shaped like ``labels`` (0 where the token does not count).
    """
    shard = vocab_shard(logits.shape[-1], *tp_size_rank(tp_group), vocab_size)
    vocab_size = shard.vocab_size
    full = logits if shard.tp_size == 1 else _GatherVocab.apply(logits, tp_group)
    logps = torch.log_softmax(full[..., :vocab_size].to(accumulate_dtype(logits.dtype)), dim=-1)
    counted = (labels >= 0) & (labels < vocab_size)
    if loss_mask is not None:
        counted &= loss_mask != 0
    label_logps = logps.gather(-1, torch.where(counted, labels.long(), 0).unsqueeze(-1))
    return torch.where(counted, label_logps.squeeze(-1), 0.0)


def _chunk_rows(logits: torch.Tensor, chunk_bytes: int | None) -> int:
    """Tokens per chunk: fp32 temporaries below ``chunk_bytes`` and ~3% of the logits."""
    batch, seq_len, local_vocab = logits.shape
    row_bytes = 4 * local_vocab * (2 if logits.dtype == torch.float64 else 1)
    budget = min(
        _DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes,
        int(logits.numel() * logits.element_size() * _CHUNK_TEMP_FRACTION),
    )
    return max(1, min(seq_len, budget // row_bytes))


def _iter_chunks(logits: torch.Tensor, rows: int):
    """Yields (b, t0, t1): views logits[b, t0:t1] never copy, whatever the strides."""
    batch, seq_len, _ = logits.shape
    for b in range(batch):
        for t0 in range(0, seq_len, rows):
            yield b, t0, min(t0 + rows, seq_len)


def chunked_token_stats(logits, local_label, shard: VocabShard, rows: int) -> torch.Tensor:
    """[3, N] per-token (max, sum exp(x - max), label logit) over this rank's valid columns."""
    batch, seq_len, _ = logits.shape
    acc = accumulate_dtype(logits.dtype)
    stats = torch.empty(3, batch, seq_len, dtype=acc, device=logits.device)
    if shard.num_valid_cols == 0:  # this rank holds only padding columns
        stats[0].fill_(float("-inf"))
        stats[1:].zero_()
        return stats.view(3, -1)
    for b, t0, t1 in _iter_chunks(logits, rows):
        x = logits[b, t0:t1, : shard.num_valid_cols]
        xf = x.to(acc)
        row_max = xf.amax(-1)
        safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        # One fp32 temporary per chunk: reuse the upcast copy when there is one.
        shifted = xf.sub_(safe_max[:, None]) if xf is not x else xf - safe_max[:, None]
        stats[0, b, t0:t1] = row_max
        stats[1, b, t0:t1] = shifted.exp_().sum(-1)
        del shifted, xf
        lab = local_label[b, t0:t1].long()
        label_logit = x.gather(-1, lab.clamp(min=0)[:, None]).squeeze(-1).to(acc)
        stats[2, b, t0:t1] = torch.where(lab >= 0, label_logit, 0.0)
    return stats.view(3, -1)


def chunked_logprobs_backward(
    logits, grad_token_logps, lse, local_label, shard: VocabShard, rows: int, inplace: bool
) -> torch.Tensor:
    """grad = g * (onehot(label) - exp(x - lse)); padded columns and uncounted tokens get 0."""
    grad = logits if inplace else torch.empty_like(logits)
    acc = accumulate_dtype(logits.dtype)
    lse = lse.view(grad_token_logps.shape)
    # Uncounted tokens have lse = +inf: exp(x - lse) = 0, no onehot, and g forced to 0 so an
    # inf/nan upstream gradient on a masked token cannot leak into the logits' gradient.
    g = torch.where(torch.isinf(lse), 0.0, grad_token_logps.to(acc))
    if shard.num_valid_cols < shard.local_vocab:
        grad[..., shard.num_valid_cols :].zero_()
    if shard.num_valid_cols == 0:
        return grad
    for b, t0, t1 in _iter_chunks(logits, rows):
        x = logits[b, t0:t1, : shard.num_valid_cols]
        xf = x.to(acc)
        row_lse = lse[b, t0:t1, None].to(acc)
        prob = xf.sub_(row_lse) if xf is not x else xf - row_lse
        prob.exp_().neg_()
        lab = local_label[b, t0:t1].long()
        prob.scatter_add_(-1, lab.clamp(min=0)[:, None], (lab >= 0).to(acc)[:, None])
        prob.mul_(g[b, t0:t1, None])
        # Computed into its own buffer before this write: in place is safe.
        grad[b, t0:t1, : shard.num_valid_cols] = prob
        del prob, xf
    return grad


class ChunkedVocabParallelLogprobsFunction(torch.autograd.Function):
    """Chunked forward/backward; saves the logits (no copy), lse and local label: 8 B/token."""

    @staticmethod
    def forward(
        ctx, logits, labels, loss_mask, tp_group, vocab_size, inplace_backward, chunk_bytes
    ):
        logits, labels3d, mask3d = as_batched(logits, labels, loss_mask)
        shard = vocab_shard(logits.shape[-1], *tp_size_rank(tp_group), vocab_size)
        counted = counted_tokens(labels3d, mask3d, shard.vocab_size)
        local_label = local_label_columns(labels3d, counted, shard)
        rows = _chunk_rows(logits, chunk_bytes)
        stats = chunked_token_stats(logits, local_label, shard, rows)
        token_logps, lse = combine_token_stats(stats, counted.view(-1), tp_group)
        ctx.save_for_backward(logits, lse, local_label)
        ctx.shard, ctx.rows, ctx.inplace_backward = shard, rows, inplace_backward
        ctx.two_dim = labels.dim() == 1
        return token_logps.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_token_logps):
        logits, lse, local_label = ctx.saved_tensors
        grad_3d = grad_token_logps.reshape(local_label.shape)
        grad = chunked_logprobs_backward(
            logits, grad_3d, lse, local_label, ctx.shard, ctx.rows, ctx.inplace_backward
        )
        if ctx.two_dim:
            grad = grad.squeeze(0)
        return grad, None, None, None, None, None, None


def chunked_vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    tp_group=None,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Memory-lean torch log-probs of ``labels`` from this rank's logits slice.

    logits [B, T, Vp] or [N, Vp] (any strides, any float dtype), labels global ids shaped like
    logits.shape[:-1], loss_mask (optional, same shape, nonzero = counted). Returns fp32 token
    log-probs shaped like labels, 0 where not counted. ``inplace_backward=True`` writes the
    gradient into the logits buffer: only when nothing else needs the logits afterwards.
    """
    return ChunkedVocabParallelLogprobsFunction.apply(
        logits, labels, loss_mask, tp_group, vocab_size, inplace_backward, chunk_bytes
    )
