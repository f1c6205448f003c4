"""Packing layouts, first-fit-decreasing bins and the packed attention, against plain references.

* The head positions, labels and RoPE positions of a packed row (pack and shared_prompt) are
  those of the unpacked sequences prompt + response, rebuilt here from scratch.
* First-fit-decreasing: every pair lands in exactly one bin, no bin exceeds the budget, the
  order is deterministic, filler bins pad the count to a multiple.
* PackedAttention's context equals dense attention with the mask written out token by token
  (its SDPA path, GQA included), and so does the batch's attention plan run call by call.
* The per-token RoPE angles give transformers' cos/sin for arbitrary positions.
"""

from __future__ import annotations

import math

import pytest
import torch

from selm_mcore.data.packing import (
    PackingError,
    auto_budget,
    check_budget,
    collate_packed,
    pack_examples,
    pair_tokens,
)
from selm_mcore.data.tokenize import TokenizedExample


def _examples(seed: int = 0, yref: bool = True) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(3, 400, (n,), generator=gen).tolist())

    shapes = [(5, 7, 3, 9), (12, 4, 11, 6), (3, 20, 2, 5), (8, 8, 8, 8), (1, 1, 1, 1)]
    return [
        TokenizedExample(
            index=i,
            prompt_ids=ids(p),
            chosen_ids=ids(c),
            rejected_ids=ids(r),
            yref_ids=ids(y) if yref else None,
        )
        for i, (p, c, r, y) in enumerate(shapes)
    ]


def _unpacked_targets(examples):
    """{(sequence id, label, position of the predicting token)} of the plain layout."""
    targets = []
    b = len(examples)
    for k, example in enumerate(examples):
        for s, response in enumerate(example.responses):
            sequence = list(example.prompt_ids) + list(response)
            start = len(example.prompt_ids)
            for t in range(start, len(sequence)):
                targets.append((s * b + k, sequence[t], t - 1))
    return sorted(targets)


@pytest.mark.parametrize("shared", [False, True])
def test_packed_row_predicts_the_unpacked_labels_from_the_same_positions(shared):
    examples = _examples()
    batch = collate_packed(
        examples, pad_id=0, shared_prompt=shared, has_yref=True, pad_to_multiple_of=16
    )
    tokens, positions = batch.tokens[0], batch.position_ids[0]
    assert tokens.shape[0] % 16 == 0 and batch.num_tokens == sum(
        pair_tokens(e, shared) for e in examples
    )
    packed = sorted(
        zip(
            batch.head_sequence.tolist(),
            batch.head_labels.tolist(),
            positions[batch.head_index].tolist(),
        )
    )
    assert packed == _unpacked_targets(examples)
    # The token at a head position is the one before its label in the unpacked sequence.
    for index, label, sequence in zip(
        batch.head_index.tolist(), batch.head_labels.tolist(), batch.head_sequence.tolist()
    ):
        example = examples[sequence % len(examples)]
        unpacked = list(example.prompt_ids) + list(example.responses[sequence // len(examples)])
        position = int(positions[index])
        assert unpacked[position] == int(tokens[index]) and unpacked[position + 1] == label
    assert batch.response_lengths().tolist() == [
        len(e.responses[s]) for s in range(3) for e in examples
    ]


def test_shared_prompt_counts_each_prompt_once():
    examples = _examples()
    shared = collate_packed(examples, pad_id=0, shared_prompt=True, has_yref=True)
    pack = collate_packed(examples, pad_id=0, shared_prompt=False, has_yref=True)
    prompts = sum(len(e.prompt_ids) for e in examples)
    assert pack.num_tokens - shared.num_tokens == 2 * prompts  # 3 responses: 2 prompts saved
    assert shared.segments.shape == (len(examples), 6)
    assert pack.segments.shape == (3 * len(examples), 6)


def test_first_fit_decreasing_bins():
    examples = _examples(seed=3) + [
        TokenizedExample(
            index=5,
            prompt_ids=(1,) * 30,
            chosen_ids=(2,) * 30,
            rejected_ids=(3,) * 30,
            yref_ids=(4,) * 30,
        )
    ]
    budget = auto_budget(examples, True, 1)
    assert budget == 120  # the long pair: 30 + 3 * 30
    bins = pack_examples(examples, budget, True)
    assert sorted(e.index for b in bins for e in b) == list(range(6))
    assert all(sum(pair_tokens(e, True) for e in b) <= budget for b in bins)
    assert [[e.index for e in b] for b in bins][0] == [5]  # longest first, alone
    assert bins == pack_examples(list(reversed(examples)), budget, True)  # order-independent
    padded = pack_examples(examples, budget, True, num_bins_multiple=4)
    assert len(padded) % 4 == 0 and padded[: len(bins)] == bins and padded[-1] == []
    with pytest.raises(PackingError, match="data.pack_tokens >= 120"):
        check_budget(examples, 119, True)


def test_empty_filler_row_has_no_head_positions():
    batch = collate_packed([], pad_id=0, shared_prompt=True, has_yref=True, row_length=32)
    assert batch.tokens.shape == (1, 32) and batch.head_index.numel() == 0
    assert batch.num_sequences == 0


def _dense_reference(q, k, v, segments, scale):
    """Softmax attention with the allowed (query, key) pairs written out one by one."""
    seq_len, batch, heads, dim = q.shape
    groups = k.shape[2]
    k = k.repeat_interleave(heads // groups, dim=2)
    v = v.repeat_interleave(heads // groups, dim=2)
    out = torch.zeros(seq_len, batch, heads * dim, dtype=q.dtype)
    for row, start, prompt, *responses in segments.tolist():
        spans = [(start, start + prompt, None)]
        offset = start + prompt
        for length in responses:
            if length:
                spans.append((offset, offset + length, (start, start + prompt)))
                offset += length
        for lo, hi, shared in spans:
            for i in range(lo, hi):
                keys = list(range(lo, i + 1)) + (list(range(*shared)) if shared else [])
                scores = torch.einsum("hd,khd->hk", q[i, row], k[keys, row]) * scale
                out[i, row] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[keys, row]).reshape(
                    -1
                )
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_packed_attention_equals_dense_masked_attention(shared):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from selm_mcore.mcore.attention import (
        PackedAttention,
        packed_layout,
        sdpa_attend,
        varlen_attention,
    )

    examples = _examples()
    batch = collate_packed(
        examples, pad_id=0, shared_prompt=shared, has_yref=True, pad_to_multiple_of=8
    )
    seq_len = batch.tokens.shape[1]
    heads, groups, dim = 4, 2, 8
    config = TransformerConfig(
        num_layers=1,
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=dim,
        attention_dropout=0.0,
    )
    attention = PackedAttention(config, layer_number=1)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(seq_len, 1, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(seq_len, 1, groups, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(seq_len, 1, groups, dim, generator=gen, dtype=torch.float64)
    got = attention(q, k, v, None, packed_seq_params=packed_layout(batch.attention_plan))
    want = _dense_reference(q, k, v, batch.segments, 1 / math.sqrt(dim))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got[batch.num_tokens :].abs().max() == 0  # padding stays zero
    # The plan's calls, run one by one through the per-sequence SDPA backend.
    flat = [x[:, 0] for x in (q, k, v)]
    context = varlen_attention(*flat, batch.attention_plan, 1 / math.sqrt(dim), sdpa_attend)
    torch.testing.assert_close(context.reshape(seq_len, -1), want[:, 0], rtol=1e-10, atol=1e-10)


def test_packed_attention_gradients_match_dense_reference():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from selm_mcore.mcore.attention import PackedAttention, packed_layout

    batch = collate_packed(_examples()[:3], pad_id=0, shared_prompt=True, has_yref=True)
    seq_len = batch.tokens.shape[1]
    config = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        num_query_groups=1,
        kv_channels=8,
        attention_dropout=0.0,
    )
    attention = PackedAttention(config, layer_number=1)
    gen = torch.Generator().manual_seed(2)
    inputs = [
        torch.randn(seq_len, 1, h, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        for h in (2, 1, 1)
    ]
    layout = packed_layout(batch.attention_plan)
    attention(*inputs, None, packed_seq_params=layout).pow(2).sum().backward()
    got = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    _dense_reference(*inputs, batch.segments, 1 / math.sqrt(8)).pow(2).sum().backward()
    for g, x in zip(got, inputs):
        torch.testing.assert_close(g, x.grad, rtol=1e-9, atol=1e-9)


def test_rope_from_positions_equals_transformers_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from selm_mcore.mcore.gpt import rope_from_positions
    from selm_mcore.mcore.model import rope_inv_freq

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, rope_theta=10000.0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2], [7, 8, 9, 3, 4, 5, 6, 0, 1]])
    angles = rope_from_positions(rope_inv_freq(config), positions)  # [T, B, 1, d]
    assert angles.shape == (9, 2, 1, 32)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions)  # [B, T, d]
    torch.testing.assert_close(angles[:, :, 0].transpose(0, 1).cos(), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(angles[:, :, 0].transpose(0, 1).sin(), sin, rtol=0, atol=1e-6)
