"""The one forward path of the reference pass and the trainer: micro-batches through Megatron.

    micro_batches = collate_micro_batches(dataset, index_groups, pad_id=..., ...)
    reduced = run_micro_batches(models, micro_batches, loss_fn, forward_only=False)   # train
    logps = forward_only_logps(models, ctx, micro_batches, vocab_size)               # reference

``run_micro_batches`` drives Megatron's ``get_forward_backward_func`` (1F1B; interleaved with
VPP); ``sequence_logps`` turns the last stage's vocab-parallel logits into summed response
log-probs (``selm_mcore.logprobs``, the fused kernel on GPU). Megatron's pipeline schedule sends
[T, N, hidden] activations between stages with one shape per call, so the micro-batches of one
call share one padded length T.

Shape legend: B examples per micro-batch, S = 2 or 3 sequences per example (chosen, rejected,
y_ref), N = S * B sequences, T padded tokens, V/tp vocabulary columns on this rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from selm_mcore.batches import PreferenceBatch, collate_preferences, padded_length
from selm_mcore.dataset import PreferenceDataset, TokenizedExample


@dataclass
class MicroBatch:
    """One micro-batch of B examples as N = S*B sequences, plus what the loss needs.

    ``ref_logps`` [N]: reference sequence log-probs in the batch's order (trainer only).
    ``sequence_lengths``: real (unpadded) length of each of the N sequences, for throughput and
    FLOPs; ``num_tokens`` is their sum.
    """

    batch: PreferenceBatch
    sequence_lengths: list[int]
    ref_logps: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.sequence_lengths)


def sequence_lengths(examples: Sequence[TokenizedExample]) -> list[int]:
    """Real lengths of the examples' sequences in collation order (chosen.., rejected.., yref..)."""
    if not examples:
        return []
    return [len(e.prompt_ids) + len(e.responses[s]) for s in range(len(examples[0].responses))
            for e in examples]


def longest_sequence(example: TokenizedExample) -> int:
    return len(example.prompt_ids) + max(map(len, example.responses))


def collate_micro_batches(dataset: PreferenceDataset, index_groups: Sequence[Sequence[int]], *,
                          pad_id: int, pad_to_multiple_of: int,
                          seq_length: int | None = None,
                          device: torch.device | None = None) -> list[MicroBatch]:
    """Collate groups of example indices into micro-batches that share one padded length T.

    Megatron's pipeline schedule sends [T, N, hidden] activations between stages with one shape
    per call, so every micro-batch of a call is padded to the longest sequence of all of them
    (rounded up to ``pad_to_multiple_of``; or ``seq_length`` when fixed).
    """
    examples = [[dataset[i] for i in group] for group in index_groups]
    longest = max(longest_sequence(e) for group in examples for e in group)
    t = padded_length(longest, pad_to_multiple_of, seq_length)
    out = []
    for group in examples:
        batch = collate_preferences(group, pad_id=pad_id, seq_length=t)
        if device is not None:
            batch = batch.to(device)
        out.append(MicroBatch(batch=batch, sequence_lengths=sequence_lengths(group)))
    return out


def sequence_logps(logits: torch.Tensor, batch: PreferenceBatch, *, tp_group,
                   vocab_size: int) -> torch.Tensor:
    """[N] fp32 summed response log-probs from this rank's vocab-parallel logits [N, T, V/tp]."""
    from selm_mcore.logprobs import vocab_parallel_logprobs

    _, seq_logps = vocab_parallel_logprobs(logits, batch.labels, batch.loss_mask,
                                           tp_group=tp_group, vocab_size=vocab_size)
    return seq_logps


def _forward_step(data_iterator, model, *, loss_fn: Callable):
    """Megatron ``forward_step_func``: one micro-batch through one model chunk.

    Every chunk consumes every micro-batch from its own iterator (inputs are only used on the
    first stage, labels only on the last), so interleaved schedules stay aligned.
    """
    micro_batch = next(data_iterator)
    batch = micro_batch.batch
    output = model(batch.tokens, batch.position_ids, attention_mask=None)
    return output, functools.partial(loss_fn, micro_batch)


def run_micro_batches(models: list, micro_batches: Sequence[MicroBatch], loss_fn: Callable, *,
                      forward_only: bool) -> list[dict[str, torch.Tensor]]:
    """Run micro-batches through Megatron's pipeline schedule (1F1B; interleaved with VPP).

    ``loss_fn(micro_batch, output)`` runs on the last pipeline stage and returns
    ``(loss, reduced: dict)``; the returned list holds each micro-batch's ``reduced`` dict on the
    last stage and is empty elsewhere. All micro-batches must share one padded length.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shapes = {tuple(mb.batch.tokens.shape) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"micro-batches of one call must share a shape, got {sorted(shapes)}")
    (num_sequences, seq_length), = shapes
    step = functools.partial(_forward_step, loss_fn=loss_fn)
    data_iterator = ([iter(micro_batches) for _ in models] if len(models) > 1
                     else iter(micro_batches))
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=step, data_iterator=data_iterator, model=models,
        num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=num_sequences, forward_only=forward_only)


def forward_only_logps(models: list, ctx, micro_batches: Sequence[MicroBatch],
                                vocab_size: int) -> list[torch.Tensor] | None:
    """Forward-only log-probs [N] of each micro-batch (last stage; None on other stages)."""
    tp_group = ctx.tp_group if ctx.tp > 1 else None

    def collect(micro_batch: MicroBatch, output: torch.Tensor):
        seq = sequence_logps(output, micro_batch.batch, tp_group=tp_group, vocab_size=vocab_size)
        return output.new_zeros(()), {"seq_logps": seq.detach().float()}

    with torch.no_grad():
        reduced = run_micro_batches(models, micro_batches, collect, forward_only=True)
    if not ctx.is_last_stage:
        return None
    return [r["seq_logps"] for r in reduced]


def megatron_ce_token_logps(logits: torch.Tensor, labels: torch.Tensor,
                            loss_mask: torch.Tensor) -> torch.Tensor:
    """Token log-probs through Megatron's vocab_parallel_cross_entropy (negated, masked).

    The comparison path of the benchmarks: an fp32 copy of the logits, the softmax saved for
    backward, padded vocabulary columns included in the softmax (the fused path excludes them).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits, labels) * loss_mask


def megatron_ce_sequence_logps(logits: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """[N] sequence log-probs of ``batch`` through ``megatron_ce_token_logps``."""
    return megatron_ce_token_logps(logits, batch.labels, batch.loss_mask).sum(-1)
