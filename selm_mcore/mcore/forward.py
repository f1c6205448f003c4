"""The one forward path of the reference pass and the trainer: micro-batches through Megatron.

    micro_batches = collate_micro_batches(dataset, index_groups, pad_id=..., ...)   # packing none
    micro_batches = pack_micro_batches(dataset, indices, budget=..., ...)           # pack/shared
    reduced = run_micro_batches(models, micro_batches, loss_fn, forward_only=False)   # train
    logps = forward_only_logps(models, ctx, micro_batches, vocab_size)               # reference

``run_micro_batches`` drives Megatron's ``get_forward_backward_func`` (1F1B; interleaved with VPP);
``sequence_logps`` turns the last stage's vocab-parallel logits into summed response log-probs
(``selm_mcore.train.logprobs``, the fused kernel on GPU). Megatron's pipeline schedule sends [T, N,
hidden] activations between stages with one shape per call, so with pipeline parallelism the
micro-batches of one call share one padded length T (packed rows: the budget).

Packed micro-batches (``selm_mcore.data.packing``) hold a varying number of pairs; each carries a
``loss_scale`` so that, after Megatron divides every micro-batch's loss by their count, the
gradient is still the mean over the global batch of pairs.

Shape legend: B examples per micro-batch, S = 2 or 3 sequences per example (chosen, rejected,
y_ref), N = S * B sequences, T padded tokens, V/tp vocabulary columns on this rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from selm_mcore.data.batches import (
    PreferenceBatch,
    collate_preferences,
    padded_length,
    to_device,
)
from selm_mcore.data.packing import PackedBatch, collate_packed, pack_examples
from selm_mcore.data.tokenize import PreferenceDataset, TokenizedExample


@dataclass
class MicroBatch:
    """One micro-batch of B examples as N = S*B sequences, plus what the loss needs.

    ``ref_logps`` [N]: reference sequence log-probs in the batch's order (trainer only).
    ``sequence_lengths``: real (unpadded) length of each of the N sequences as if unpacked.
    ``num_tokens``: tokens fed to the model (no padding; a shared prompt counts once);
    ``num_computed``: tokens the model computes on (padding included).
    ``loss_scale``: packed micro-batches return ``sum of per-pair losses * loss_scale`` (None:
    the mean over the micro-batch, as unpacked ones do).
    ``counts`` float64 [4]: examples, tokens, computed tokens and model FLOPs of the step's
    metrics, made on the host with the batch (the loss needs no host-to-device copy of its own).
    """

    batch: PreferenceBatch | PackedBatch
    sequence_lengths: list[int]
    num_tokens: int
    num_computed: int
    loss_scale: float | None = None
    ref_logps: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return isinstance(self.batch, PackedBatch)

    def to(self, device: torch.device | str) -> MicroBatch:
        """The micro-batch with its tensors on ``device`` (pinned, non-blocking from the host):
        moved before the schedule runs, so no micro-batch copies anything on its own."""
        return dataclasses.replace(
            self,
            batch=self.batch.to(device),
            ref_logps=None if self.ref_logps is None else to_device(self.ref_logps, device),
            counts=None if self.counts is None else to_device(self.counts, device),
        )


def token_multiple(models: Sequence) -> int:
    """What the chunks need each micro-batch's length T to be a multiple of: tp under sequence
    parallelism (T/tp positions per rank, also in the pipeline's p2p messages), else 1."""
    config = models[0].config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def length_multiple(
    pad_to_multiple_of: int, models: Sequence | None = None, *, multiple: int = 1
) -> int:
    """``pad_to_multiple_of`` made a multiple of what the model needs (``token_multiple`` of
    ``models``, or ``multiple``): the padding multiple to collate micro-batches with."""
    need = token_multiple(models) if models is not None else multiple
    return math.lcm(pad_to_multiple_of, need)


def sequence_lengths(examples: Sequence[TokenizedExample]) -> list[int]:
    """Real lengths of the examples' sequences in collation order (chosen.., rejected.., yref..)."""
    if not examples:
        return []
    return [
        len(e.prompt_ids) + len(e.responses[s])
        for s in range(len(examples[0].responses))
        for e in examples
    ]


def longest_sequence(example: TokenizedExample) -> int:
    return len(example.prompt_ids) + max(map(len, example.responses))


def collate_micro_batches(
    dataset: PreferenceDataset,
    index_groups: Sequence[Sequence[int]],
    *,
    pad_id: int,
    pad_to_multiple_of: int,
    seq_length: int | None = None,
    device: torch.device | None = None,
) -> list[MicroBatch]:
    """Collate groups of example indices into micro-batches that share one padded length T.

    Megatron's pipeline schedule sends [T, N, hidden] activations between stages with one shape
    per call, so every micro-batch of a call is padded to the longest sequence of all of them
    (rounded up to ``pad_to_multiple_of``; or ``seq_length`` when fixed).
    """
    examples = [[dataset[i] for i in group] for group in index_groups]
    longest = max(longest_sequence(e) for group in examples for e in group)
    if seq_length is not None:
        seq_length = -(-seq_length // pad_to_multiple_of) * pad_to_multiple_of
    t = padded_length(longest, pad_to_multiple_of, seq_length)
    out = []
    for group in examples:
        batch = collate_preferences(group, pad_id=pad_id, seq_length=t)
        if device is not None:
            batch = batch.to(device)
        lengths = sequence_lengths(group)
        out.append(
            MicroBatch(
                batch=batch,
                sequence_lengths=lengths,
                num_tokens=sum(lengths),
                num_computed=batch.tokens.numel(),
            )
        )
    return out


def pack_micro_batches(
    dataset: PreferenceDataset,
    indices: Sequence[int],
    *,
    budget: int,
    shared_prompt: bool,
    pad_id: int,
    pad_to_multiple_of: int,
    fixed_length: bool,
    num_microbatches_multiple: int = 1,
    examples_per_step: int | None = None,
    device: torch.device | None = None,
) -> list[MicroBatch]:
    """The examples ``indices`` packed first-fit-decreasing into rows of ``budget`` tokens, one
    row per micro-batch (``selm_mcore.data.packing``).

    ``fixed_length``: every row is ``budget`` long (pipeline parallelism), else each is trimmed to
    its tokens rounded up to ``pad_to_multiple_of``. ``examples_per_step`` (this rank's share of
    the global batch) sets each micro-batch's ``loss_scale``; None for forward-only passes.
    """
    bins = pack_examples(
        [dataset[i] for i in indices],
        budget,
        shared_prompt,
        num_bins_multiple=num_microbatches_multiple,
    )
    scale = None if examples_per_step is None else len(bins) / examples_per_step
    out = []
    for group in bins:
        batch = collate_packed(
            group,
            pad_id=pad_id,
            shared_prompt=shared_prompt,
            has_yref=dataset.has_yref,
            row_length=budget if fixed_length else None,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        if device is not None:
            batch = batch.to(device)
        out.append(
            MicroBatch(
                batch=batch,
                sequence_lengths=sequence_lengths(group),
                num_tokens=batch.num_tokens,
                num_computed=batch.tokens.numel(),
                loss_scale=scale,
            )
        )
    return out


def sequence_logps(
    logits: torch.Tensor, batch: PreferenceBatch | PackedBatch, *, tp_group, vocab_size: int
) -> torch.Tensor:
    """[N] fp32 summed response log-probs from this rank's vocab-parallel logits: [N, T, V/tp]
    of an unpacked batch, or [M, V/tp] of a packed batch's head positions.

    The logits (GPTModel's output: a fresh [N, T, V/tp] tensor, or the packed head rows) are
    read by nothing but the log-prob kernel, so its backward writes the gradient into their
    buffer (no second logits-sized tensor); their labels are token ids of the tokenizer,
    checked against the vocabulary when the data is loaded
    (``PreferenceDataset.check_token_ids``), so no per-micro-batch check (a host sync) here.
    """
    from selm_mcore.train.logprobs import vocab_parallel_logprobs

    if isinstance(batch, PackedBatch):
        if batch.head_index.numel() == 0:  # a filler micro-batch (interleaved pipelines)
            return logits.float().sum() * 0.0 + logits.new_zeros(
                batch.num_sequences, dtype=torch.float32
            )
        token_logps, _ = vocab_parallel_logprobs(
            logits,
            batch.head_labels,
            None,
            tp_group=tp_group,
            vocab_size=vocab_size,
            inplace_backward=True,
            check_labels=False,
        )
        return token_logps.new_zeros(batch.num_sequences).index_add(
            0, batch.head_sequence, token_logps
        )
    _, seq_logps = vocab_parallel_logprobs(
        logits,
        batch.labels,
        batch.loss_mask,
        tp_group=tp_group,
        vocab_size=vocab_size,
        inplace_backward=True,
        check_labels=False,
    )
    return seq_logps


def _forward_step(data_iterator, model, *, loss_fn: Callable):
    """Megatron ``forward_step_func``: one micro-batch through one model chunk.

    Every chunk consumes every micro-batch from its own iterator (inputs are only used on the
    first stage, labels only on the last), so interleaved schedules stay aligned.
    """
    micro_batch = next(data_iterator)
    batch = micro_batch.batch
    if micro_batch.packed:
        output = model(
            batch.tokens,
            batch.position_ids,
            attention_plan=batch.attention_plan,
            head_index=batch.head_index,
        )
    else:
        output = model(batch.tokens, batch.position_ids, attention_mask=None)
    return output, functools.partial(loss_fn, micro_batch)


def run_micro_batches(
    models: list, micro_batches: Sequence[MicroBatch], loss_fn: Callable, *, forward_only: bool
) -> list[dict[str, torch.Tensor]]:
    """Run micro-batches through Megatron's pipeline schedule (1F1B; interleaved with VPP).

    ``loss_fn(micro_batch, output)`` runs on the last pipeline stage and returns
    ``(loss, reduced: dict)``; the returned list holds each micro-batch's ``reduced`` dict on the
    last stage and is empty elsewhere. With pipeline parallelism all micro-batches must share
    one shape (the activations sent between stages have one shape per call).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shapes = {tuple(mb.batch.tokens.shape) for mb in micro_batches}
    if len(shapes) != 1 and models[0].config.pipeline_model_parallel_size > 1:
        raise ValueError(
            f"micro-batches of one pipelined call must share a shape, got {sorted(shapes)}"
        )
    multiple = token_multiple(models)
    if any(shape[1] % multiple for shape in shapes):
        raise ValueError(
            f"micro-batch lengths {sorted({s[1] for s in shapes})} must be "
            f"multiples of {multiple} (sequence parallelism splits T over tp "
            "ranks): collate with pad_to_multiple_of = forward.length_multiple(...)"
        )
    num_sequences, seq_length = max(shapes)
    step = functools.partial(_forward_step, loss_fn=loss_fn)
    data_iterator = (
        [iter(micro_batches) for _ in models] if len(models) > 1 else iter(micro_batches)
    )
    forward_backward = get_forward_backward_func()
    return forward_backward(
        forward_step_func=step,
        data_iterator=data_iterator,
        model=models,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=num_sequences,
        forward_only=forward_only,
    )


def forward_only_logps(
    models: list, ctx, micro_batches: Sequence[MicroBatch], vocab_size: int
) -> list[torch.Tensor] | None:
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


def megatron_ce_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Token log-probs through Megatron's vocab_parallel_cross_entropy (negated, masked).

    The comparison path of the benchmarks: an fp32 copy of the logits, the softmax saved for
    backward, padded vocabulary columns included in the softmax (the fused path excludes them).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits, labels) * loss_mask


def megatron_ce_sequence_logps(logits: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """[N] sequence log-probs of ``batch`` through ``megatron_ce_token_logps``."""
    return megatron_ce_token_logps(logits, batch.labels, batch.loss_mask).sum(-1)
