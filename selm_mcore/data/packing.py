"""Packed micro-batches: a step's pairs in rows of a fixed token budget, one prompt per pair.

``data.packing`` chooses how the sequences of a micro-batch are laid out:

    none           [S*B, T]: every sequence (prompt + response) in its own right-padded row
                   (``selm_mcore.data.batches.collate_preferences``);
    pack           every sequence once, back to back in one row of ``budget`` tokens: attention
                   stays inside a sequence and RoPE positions restart at each sequence;
    shared_prompt  per pair ONE copy of the prompt followed by its 2 or 3 responses,
                   [prompt | y_w | y_l | y_ref]: each response attends to the prompt and causally
                   to itself, and its positions continue from the prompt's length, so its
                   log-probs equal those of the unpacked sequence prompt + response.

All sequences of a pair land in the same micro-batch. The pairs of a step (one DP rank's slice)
are packed first-fit-decreasing into as few rows as fit; each row is one micro-batch.

What bounds a pair: truncation (``selm_mcore.data.tokenize``) decides the prompt and chosen/rejected
from the pair alone and cuts y_ref on its own to what fits after that prompt, so each sequence
(prompt + response) is at most data.max_length tokens. A pair of P prompt tokens then takes at
most ``3 * max_length`` tokens in ``pack`` and ``P + 3 * (max_length - P)`` in
``shared_prompt`` (2 instead of 3 without y_ref); ``auto_budget`` is the longest actual pair and
``check_budget`` refuses a budget some pair does not fit.

The layout is ``PackedBatch.segments``, an int64 CPU tensor [G, 6] with one row per group of
tokens that attend to each other (a pair in shared_prompt, a sequence in pack):
``(row, start, prompt_len, r1, r2, r3)``: tokens ``[start, start + prompt_len)`` attend causally;
the responses follow back to back, response k attending to the prompt and causally to itself.
In ``pack`` every sequence is a group with ``prompt_len`` = its length and no responses. The
attention reads it as ``PackedBatch.attention_plan`` (``selm_mcore.data.attention_plan``: gather
indices, cumulative lengths, maximum lengths), built here once per micro-batch on the host.

Only positions whose next token is a response token go through the LM head and the log-prob
kernel (``head_index``, flat over [rows, T]); in shared_prompt the prompt's last position
predicts the first token of every response, so it appears once per response.

Shape legend: R rows (1 per micro-batch), T row length, B pairs, S = 2 or 3 sequences per pair,
M head positions, G attention groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from selm_mcore.data.attention_plan import AttentionPlan, attention_plan
from selm_mcore.data.batches import PairOrder, to_device
from selm_mcore.data.tokenize import TokenizedExample
from selm_mcore.runtime.errors import UserError

PACKING_MODES = ("none", "pack", "shared_prompt")
SEGMENT_COLUMNS = ("row", "start", "prompt_len", "r1", "r2", "r3")
MAX_RESPONSES = 3


class PackingError(UserError, ValueError):
    """A pair that does not fit the packing budget (or a budget that cannot work)."""


# --- sizes and bins ---------------------------------------------------------------------------


def pair_tokens(example: TokenizedExample, shared_prompt: bool) -> int:
    """Tokens a pair takes in a packed row: its prompt once (shared) or once per response."""
    prompt = len(example.prompt_ids)
    responses = [len(r) for r in example.responses]
    if shared_prompt:
        return prompt + sum(responses)
    return sum(prompt + r for r in responses)


def auto_budget(examples: Sequence[TokenizedExample], shared_prompt: bool, multiple: int) -> int:
    """The smallest budget every pair fits alone: the longest packed pair, rounded up."""
    longest = max(pair_tokens(e, shared_prompt) for e in examples)
    return int(math.ceil(longest / multiple) * multiple)


def check_budget(examples: Sequence[TokenizedExample], budget: int, shared_prompt: bool) -> None:
    """Refuse a budget some pair does not fit in (never drop a pair silently)."""
    sizes = [(pair_tokens(e, shared_prompt), e) for e in examples]
    too_long = [(size, e) for size, e in sizes if size > budget]
    if too_long:
        size, example = max(too_long, key=lambda item: item[0])
        raise PackingError(
            f"{len(too_long)} pair(s) do not fit data.pack_tokens={budget}; the longest, example "
            f"{example.index} (prompt {len(example.prompt_ids)} + responses "
            f"{[len(r) for r in example.responses]} tokens), needs {size}. Fix: set "
            f"data.pack_tokens >= {size} (or 0: the longest pair of the data), or lower "
            "data.max_length / data.max_prompt_length so truncation shortens such pairs"
        )


def pack_budget(
    data_cfg, examples: Sequence[TokenizedExample], *, refpass: bool = False, multiple: int = 1
) -> int:
    """Tokens per packed micro-batch under ``data_cfg`` (0 with data.packing=none):
    data.pack_tokens,
    else the longest pair; the forward-only reference pass packs twice as much by default
    (data.refpass_pack_tokens). Every pair must fit (``PackingError`` otherwise).

    ``multiple``: the budget is rounded up to a multiple of it (sequence parallelism needs
    rows of a multiple of tp tokens: ``selm_mcore.mcore.model.sequence_length_multiple``).
    """
    if data_cfg.packing == "none":
        return 0
    shared = data_cfg.packing == "shared_prompt"
    budget = data_cfg.pack_tokens or auto_budget(examples, shared, data_cfg.pad_to_multiple_of)
    if refpass:
        budget = data_cfg.refpass_pack_tokens or 2 * budget
    budget = -(-budget // multiple) * multiple
    check_budget(examples, budget, shared)
    return budget


def pack_examples(
    examples: Sequence[TokenizedExample],
    budget: int,
    shared_prompt: bool,
    *,
    num_bins_multiple: int = 1,
) -> list[list[TokenizedExample]]:
    """First-fit-decreasing bins of pairs whose packed sizes fit ``budget``.

    Deterministic: pairs are taken longest first (ties by dataset index), each into the first
    bin with room. ``num_bins_multiple`` pads the bin list with empty bins (interleaved pipeline
    schedules need a micro-batch count divisible by the pipeline size).
    """
    check_budget(examples, budget, shared_prompt)
    order = sorted(examples, key=lambda e: (-pair_tokens(e, shared_prompt), e.index))
    bins: list[list[TokenizedExample]] = []
    free: list[int] = []
    for example in order:
        size = pair_tokens(example, shared_prompt)
        for i, room in enumerate(free):
            if size <= room:
                bins[i].append(example)
                free[i] -= size
                break
        else:
            bins.append([example])
            free.append(budget - size)
    for group in bins:
        group.sort(key=lambda e: e.index)
    while len(bins) % num_bins_multiple:
        bins.append([])
    return bins


# --- the packed batch -------------------------------------------------------------------------


@dataclass
class PackedBatch(PairOrder):
    """One micro-batch of B pairs packed into R rows (see the module docstring).

    tokens, position_ids (the RoPE positions): int64 [R, T]; segments: int64 [G, 6], on the host;
    attention_plan: the layout as varlen calls (``selm_mcore.data.attention_plan``), read by the
    attention of every layer; head_index: int64 [M] into the flattened [R * T] positions;
    head_labels: int64 [M]; head_sequence: int64 [M], the sequence each head position belongs to
    in the pair order [chosen_0..B-1, rejected_0..B-1, (yref_0..B-1)]; sequence_response_lengths:
    int64 [N], the response tokens of each sequence; example_indices: int64 [B], on the host.
    ``num_tokens`` counts the tokens fed (no padding).
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    head_index: torch.Tensor
    head_labels: torch.Tensor
    head_sequence: torch.Tensor
    example_indices: torch.Tensor
    has_yref: bool
    num_tokens: int
    attention_plan: AttentionPlan
    sequence_response_lengths: torch.Tensor

    def to(self, device: torch.device | str) -> PackedBatch:
        """Tensors to ``device`` (pinned, non-blocking from the host); ``segments`` and
        ``example_indices`` stay on the host, where only the host reads them."""
        return PackedBatch(
            tokens=to_device(self.tokens, device),
            position_ids=to_device(self.position_ids, device),
            segments=self.segments,
            head_index=to_device(self.head_index, device),
            head_labels=to_device(self.head_labels, device),
            head_sequence=to_device(self.head_sequence, device),
            example_indices=self.example_indices,
            has_yref=self.has_yref,
            num_tokens=self.num_tokens,
            attention_plan=self.attention_plan.to(device),
            sequence_response_lengths=to_device(self.sequence_response_lengths, device),
        )

    def response_lengths(self) -> torch.Tensor:
        """[N] response tokens of each sequence (the labels each sequence sums)."""
        return self.sequence_response_lengths


class _RowBuilder:
    """Appends token runs to one row and records positions, head positions and groups."""

    def __init__(self, row: int):
        self.row = row
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.head_index: list[int] = []
        self.head_labels: list[int] = []
        self.head_sequence: list[int] = []
        self.segments: list[list[int]] = []

    def add_group(
        self,
        prompt: Sequence[int],
        responses: Sequence[Sequence[int]],
        sequence_ids: Sequence[int],
        shared: bool,
    ) -> None:
        """A prompt and its responses; shared: one prompt, else prompt + response runs."""
        start = len(self.tokens)
        self.tokens.extend(prompt)
        self.positions.extend(range(len(prompt)))
        if shared:
            for response, sequence in zip(responses, sequence_ids):
                self._response(
                    response, sequence, predictor=start + len(prompt) - 1, position=len(prompt)
                )
            lengths = [len(r) for r in responses] + [0] * (MAX_RESPONSES - len(responses))
            self.segments.append([self.row, start, len(prompt), *lengths])
            return
        # pack: one sequence, prompt + response, attending causally to itself
        (response,), (sequence,) = responses, sequence_ids
        self._response(response, sequence, predictor=start + len(prompt) - 1, position=len(prompt))
        self.segments.append([self.row, start, len(prompt) + len(response), 0, 0, 0])

    def _response(
        self, response: Sequence[int], sequence: int, predictor: int, position: int
    ) -> None:
        # Position of the prompt's last token predicts response[0]; response[j-1] predicts j.
        first = len(self.tokens)
        self.head_index.extend([predictor] + list(range(first, first + len(response) - 1)))
        self.head_labels.extend(response)
        self.head_sequence.extend([sequence] * len(response))
        self.tokens.extend(response)
        self.positions.extend(range(position, position + len(response)))


def collate_packed(
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    shared_prompt: bool,
    has_yref: bool,
    row_length: int | None = None,
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """One packed row holding every sequence of ``examples`` (see the module docstring).

    ``row_length`` fixes T (pipeline parallelism needs one shape per call); otherwise T is the
    used length rounded up to ``pad_to_multiple_of``. An empty ``examples`` gives an all-padding
    row with no head positions (a filler micro-batch).
    """
    if any((e.yref_ids is not None) != has_yref for e in examples):
        raise ValueError(
            f"a micro-batch mixes examples with and without y_ref (has_yref={has_yref})"
        )
    num_examples = len(examples)
    builder = _RowBuilder(row=0)
    for b, example in enumerate(examples):
        if not example.prompt_ids:
            raise ValueError(
                f"example {example.index}: the prompt has no tokens; the first "
                "response token needs a position to be predicted from"
            )
        sequence_ids = [s * num_examples + b for s in range(len(example.responses))]
        if shared_prompt:
            builder.add_group(example.prompt_ids, example.responses, sequence_ids, shared=True)
        else:
            for response, sequence in zip(example.responses, sequence_ids):
                builder.add_group(example.prompt_ids, [response], [sequence], shared=False)
    used = len(builder.tokens)
    length = (
        row_length
        if row_length is not None
        else max(pad_to_multiple_of, int(math.ceil(used / pad_to_multiple_of) * pad_to_multiple_of))
    )
    if used > length:
        raise PackingError(f"{used} packed tokens do not fit a row of {length}")
    tokens = torch.full((1, length), pad_id, dtype=torch.long)
    tokens[0, :used] = torch.tensor(builder.tokens, dtype=torch.long)
    positions = torch.zeros((1, length), dtype=torch.long)
    positions[0, :used] = torch.tensor(builder.positions, dtype=torch.long)
    positions[0, used:] = torch.arange(length - used)  # padding: attends to itself only
    segments = torch.tensor(builder.segments, dtype=torch.long).reshape(-1, len(SEGMENT_COLUMNS))
    head_sequence = torch.tensor(builder.head_sequence, dtype=torch.long)
    num_sequences = num_examples * (3 if has_yref else 2)
    return PackedBatch(
        tokens=tokens,
        position_ids=positions,
        segments=segments,
        head_index=torch.tensor(builder.head_index, dtype=torch.long),
        head_labels=torch.tensor(builder.head_labels, dtype=torch.long),
        head_sequence=head_sequence,
        example_indices=torch.tensor([e.index for e in examples], dtype=torch.long),
        has_yref=has_yref,
        num_tokens=used,
        attention_plan=attention_plan(segments, length),
        sequence_response_lengths=torch.bincount(head_sequence, minlength=num_sequences),
    )
