"""The attention plan of a packed micro-batch: who attends to whom, as variable-length calls.

    plan = attention_plan(segments, row_length)     # once per micro-batch, at collation (host)
    plan = plan.to(device)                          # pinned memory, non_blocking: no host sync
    for call in plan.calls: ...                     # every layer's core attention reads it

A packed row's attention groups (``selm_mcore.data.packing``: ``(row, start, prompt_len, r1, r2,
r3)`` per group) become at most two variable-length attention calls over the flattened [R * T]
token positions:

* prompts: the first ``prompt_len`` tokens of each group attend causally to themselves (in
  ``pack`` a group is one whole sequence, so this is the only call);
* responses: the queries of response k attend to the keys [prompt; response k], causal with the
  diagonal at the bottom right (query i of a response of length L sees the P prompt keys and the
  response keys <= i). The keys are gathered by index, so a prompt's keys appear once per
  response and the shared-prompt mask needs no mask tensor and no log-sum-exp merge.

Each call (``VarlenCall``) holds flash-attn's / ``torch.nn.attention.varlen``'s arguments: int64
``query_index`` [Tq] and ``key_index`` [Tk] (flat token positions), int32 ``cu_q`` / ``cu_k``
[S + 1] (cumulative lengths), the maximum lengths as Python ints, and every sequence's lengths as
Python tuples (the per-sequence loop of the CPU path reads them without touching a tensor).
Building the plan in the data stage means no layer computes indices or copies them to the device:
a packed forward makes no host synchronisation for its layout.

Shape legend: R rows, T row length, G groups, S sequences of one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selm_mcore.data.batches import is_on, to_device


@dataclass(frozen=True)
class VarlenCall:
    """One variable-length attention call (module docstring): sequence s takes the queries
    ``query_index[cu_q[s]:cu_q[s+1]]`` and the keys/values ``key_index[cu_k[s]:cu_k[s+1]]``."""

    query_index: torch.Tensor
    key_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    query_lengths: tuple[int, ...]
    key_lengths: tuple[int, ...]
    max_q: int
    max_k: int

    @property
    def self_attention(self) -> bool:
        """Queries and keys are the same tokens (the prompts / whole-sequence call)."""
        return self.key_index is self.query_index

    def to(self, device: torch.device | str) -> VarlenCall:
        query_index, cu_q = to_device(self.query_index, device), to_device(self.cu_q, device)
        same = self.self_attention
        return VarlenCall(
            query_index=query_index,
            key_index=query_index if same else to_device(self.key_index, device),
            cu_q=cu_q,
            cu_k=cu_q if same else to_device(self.cu_k, device),
            query_lengths=self.query_lengths,
            key_lengths=self.key_lengths,
            max_q=self.max_q,
            max_k=self.max_k,
        )


@dataclass(frozen=True)
class AttentionPlan:
    """The varlen calls of one packed micro-batch of ``num_rows`` rows of ``row_length`` tokens;
    positions in no call (padding) get a zero context."""

    calls: tuple[VarlenCall, ...]
    num_rows: int
    row_length: int

    def to(self, device: torch.device | str) -> AttentionPlan:
        """The plan on ``device`` (itself when already there)."""
        tensors = [t for c in self.calls for t in (c.query_index, c.key_index, c.cu_q, c.cu_k)]
        if all(is_on(t, device) for t in tensors):
            return self
        return AttentionPlan(
            calls=tuple(call.to(device) for call in self.calls),
            num_rows=self.num_rows,
            row_length=self.row_length,
        )


def concatenated_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """int64 [sum(lengths)]: ``arange(s, s + l)`` for each (s, l), one after the other."""
    total = int(lengths.sum())
    offsets = lengths.cumsum(0) - lengths
    within = torch.arange(total, dtype=torch.long) - offsets.repeat_interleave(lengths)
    return starts.repeat_interleave(lengths) + within


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return cu


def _call(query_index, key_index, query_lengths, key_lengths) -> VarlenCall:
    q_lengths, k_lengths = tuple(query_lengths.tolist()), tuple(key_lengths.tolist())
    cu_q = _cumulative(query_lengths)
    same = key_index is query_index
    return VarlenCall(
        query_index=query_index,
        key_index=key_index,
        cu_q=cu_q,
        cu_k=cu_q if same else _cumulative(key_lengths),
        query_lengths=q_lengths,
        key_lengths=k_lengths,
        max_q=max(q_lengths),
        max_k=max(k_lengths),
    )


def attention_plan(segments: torch.Tensor, row_length: int, num_rows: int = 1) -> AttentionPlan:
    """The plan of a packed micro-batch's ``segments`` (int64 [G, 6] on the host, see
    ``selm_mcore.data.packing``) for rows of ``row_length`` tokens (module docstring)."""
    if segments.device.type != "cpu":
        raise ValueError("attention_plan builds on the host: pass the CPU segments")
    segments = segments.to(torch.long)
    calls: list[VarlenCall] = []
    if segments.shape[0]:
        base = segments[:, 0] * row_length + segments[:, 1]
        prompt_lens, responses = segments[:, 2], segments[:, 3:]
        prompt_index = concatenated_ranges(base, prompt_lens)
        calls.append(_call(prompt_index, prompt_index, prompt_lens, prompt_lens))
        present = responses > 0
        if bool(present.any()):
            offsets = responses.cumsum(1) - responses  # each response's start after the prompt
            response_starts = (base + prompt_lens)[:, None] + offsets
            prompt_of = base[:, None].expand_as(responses)
            prompt_len_of = prompt_lens[:, None].expand_as(responses)
            starts, lengths = response_starts[present], responses[present]
            key_starts = torch.stack([prompt_of[present], starts], 1).flatten()
            key_lengths = torch.stack([prompt_len_of[present], lengths], 1).flatten()
            calls.append(
                _call(
                    concatenated_ranges(starts, lengths),
                    concatenated_ranges(key_starts, key_lengths),
                    lengths,
                    prompt_len_of[present] + lengths,
                )
            )
    return AttentionPlan(calls=tuple(calls), num_rows=num_rows, row_length=row_length)
