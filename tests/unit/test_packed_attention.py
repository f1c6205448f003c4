"""The CUDA decomposition of packed attention, run on CPU against a dense masked reference.

On CUDA ``PackedAttention`` runs each micro-batch's ``AttentionPlan`` through torch's
``varlen_attn`` (``varlen_adapter``). Here the same adapter and the same plan run a pure-torch
function with ``varlen_attn``'s contract (cumulative lengths, causal = the diagonal at the
bottom right when a sequence has more keys than queries, grouped-query heads), and the result is
compared, forward and backward, with softmax attention under a [T, T] mask written out here from
the examples' lengths (not from the plan or the segments), at 1e-5 in fp32:

* layouts: shared_prompt with 2 and 3 responses per prompt, plain ``pack``, odd lengths, several
  rows' worth of pairs in one row, a one-token prompt and response, GQA (4 query heads on 2 and
  on 1 key/value heads);
* both signatures the adapter meets: torch 2.13's (``window_size``, ``scale``, ``enable_gqa``)
  and the first one (``is_causal``, no ``scale``: the scale is folded into the queries);
* the plan itself: its indices are the token positions of each group, its lengths its tuples.
"""

from __future__ import annotations

import math

import pytest
import torch

from selm_mcore.data.attention_plan import attention_plan
from selm_mcore.data.packing import collate_packed
from selm_mcore.data.tokenize import TokenizedExample

TOL = 1e-5


def _reference_rows(q, k, v, cu_q, cu_k, scale, causal, gqa):
    """Per sequence: fp32 softmax attention, causal with the diagonal at the bottom right."""
    heads, groups = q.shape[1], k.shape[1]
    if heads != groups and not gqa:
        raise ValueError("query and key heads differ without GQA")
    out = torch.zeros_like(q)
    for s in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        qs = q[q0:q1].transpose(0, 1)  # [h, L, d]
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(heads // groups, 0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(heads // groups, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        if causal:
            length, keys = q1 - q0, k1 - k0
            allowed = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[q0:q1] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def varlen_attn_2_13(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    """torch 2.13's ``varlen_attn`` contract in plain torch."""
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert max_k == int((cu_seq_k[1:] - cu_seq_k[:-1]).max())
    assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    causal = tuple(window_size) == (-1, 0)
    return _reference_rows(query, key, value, cu_seq_q, cu_seq_k, scale, causal, enable_gqa)


def varlen_attn_first(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """The first release's contract: ``is_causal``, the default scale, GQA by head count."""
    scale = query.shape[-1] ** -0.5
    return _reference_rows(query, key, value, cu_seq_q, cu_seq_k, scale, is_causal, True)


def _examples(shapes, seed: int) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(3, 400, (n,), generator=gen).tolist()) if n else None

    return [
        TokenizedExample(
            index=i, prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r), yref_ids=ids(y)
        )
        for i, (p, c, r, y) in enumerate(shapes)
    ]


def dense_mask(examples, shared: bool, row_length: int) -> torch.Tensor:
    """[T, T] allowed (query, key) pairs, laid out as collate_packed lays out the examples."""
    allowed = torch.zeros(row_length, row_length, dtype=torch.bool)
    pos = 0
    for example in examples:
        prompt = len(example.prompt_ids)
        responses = [len(r) for r in example.responses]
        if shared:
            p0 = pos
            allowed[p0 : p0 + prompt, p0 : p0 + prompt] = torch.ones(prompt, prompt).tril().bool()
            pos += prompt
            for length in responses:
                allowed[pos : pos + length, p0 : p0 + prompt] = True
                own = torch.ones(length, length).tril().bool()
                allowed[pos : pos + length, pos : pos + length] = own
                pos += length
        else:
            for length in responses:
                n = prompt + length
                allowed[pos : pos + n, pos : pos + n] = torch.ones(n, n).tril().bool()
                pos += n
    return allowed


def dense_attention(q, k, v, allowed, scale):
    """[T, h, d] softmax attention under ``allowed``; rows with no key (padding) are zero."""
    heads, groups = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // groups, 1)
    v = v.repeat_interleave(heads // groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return torch.einsum("hqk,khd->qhd", probs, v)


LAYOUTS = {
    # name: (pair shapes (prompt, chosen, rejected, y_ref; 0 = no y_ref), shared)
    "shared_3_responses_odd": ([(5, 7, 3, 9), (12, 4, 11, 6), (3, 20, 2, 5)], True),
    "shared_2_responses": ([(9, 13, 1, 0), (1, 1, 17, 0), (6, 2, 8, 0)], True),
    "shared_one_token": ([(1, 1, 1, 1), (2, 1, 3, 1)], True),
    "pack_odd": ([(5, 7, 3, 9), (12, 4, 11, 6), (3, 20, 2, 5)], False),
    "pack_2_responses": ([(9, 13, 1, 0), (7, 3, 5, 0)], False),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("heads, groups", [(4, 2), (4, 1), (2, 2)])
@pytest.mark.parametrize("function", [varlen_attn_2_13, varlen_attn_first])
def test_varlen_decomposition_equals_dense_masked_attention(layout, heads, groups, function):
    from selm_mcore.mcore.attention import varlen_adapter, varlen_attention

    shapes, shared = LAYOUTS[layout]
    examples = _examples(shapes, seed=len(layout) + heads + groups)
    has_yref = examples[0].yref_ids is not None
    batch = collate_packed(
        examples, pad_id=0, shared_prompt=shared, has_yref=has_yref, pad_to_multiple_of=16
    )
    seq_len, dim = batch.tokens.shape[1], 8
    assert seq_len > batch.num_tokens  # padding positions too
    gen = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(seq_len, h, dim, generator=gen, requires_grad=True)
        for h in (heads, groups, groups)
    )
    # not the default 1/sqrt(d) with 4 heads: the first signature then folds it into the queries
    scale = 0.3 if heads == 4 else 1 / math.sqrt(dim)
    got = varlen_attention(q, k, v, batch.attention_plan, scale, varlen_adapter(function))
    upstream = torch.randn(got.shape, generator=gen)
    (got * upstream).sum().backward()
    got_grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None

    allowed = dense_mask(examples, shared, seq_len)
    want = dense_attention(q, k, v, allowed, scale)
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert got[batch.num_tokens :].abs().max() == 0  # padding stays zero
    for name, g, x in zip("qkv", got_grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad, rtol=TOL, atol=TOL, msg=f"grad of {name}")


def test_adapter_reads_the_signature():
    from selm_mcore.mcore.attention import varlen_adapter

    calls = []

    def newest(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kw):
        calls.append({"scale": scale, "window_size": window_size, **kw})
        return q

    def unknown(q, k, v, cu_q, cu_k, max_q, max_k):
        return q

    batch = collate_packed(
        _examples([(3, 2, 2, 2)], 0), pad_id=0, shared_prompt=True, has_yref=True
    )
    call = batch.attention_plan.calls[1]
    q = torch.zeros(call.query_index.numel(), 4, 8)
    k = torch.zeros(call.key_index.numel(), 2, 8)
    varlen_adapter(newest)(q, k, k, call, 0.25)
    assert calls == [{"scale": 0.25, "window_size": (-1, 0)}]  # no enable_gqa parameter
    with pytest.raises(RuntimeError, match="neither window_size nor is_causal"):
        varlen_adapter(unknown)


def test_plan_holds_each_groups_positions_and_lengths():
    examples = _examples([(3, 2, 4, 1), (2, 5, 1, 3)], seed=1)
    batch = collate_packed(examples, pad_id=0, shared_prompt=True, has_yref=True)
    prompts, responses = batch.attention_plan.calls
    # pair 0 at [0, 10): prompt 0-2, responses 3-4, 5-8, 9; pair 1 at [10, 21)
    assert prompts.query_index.tolist() == [0, 1, 2, 10, 11]
    assert prompts.key_index is prompts.query_index and prompts.self_attention
    assert prompts.query_lengths == prompts.key_lengths == (3, 2)
    assert prompts.cu_q.tolist() == [0, 3, 5] and (prompts.max_q, prompts.max_k) == (3, 3)
    assert responses.query_lengths == (2, 4, 1, 5, 1, 3)
    assert responses.key_lengths == (5, 7, 4, 7, 3, 5)
    assert responses.query_index.tolist() == [3, 4, 5, 6, 7, 8, 9] + list(range(12, 21))
    assert responses.key_index[:16].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 0, 1, 2, 9]
    assert responses.cu_k.tolist() == [0, 5, 12, 16, 23, 26, 31]
    assert (responses.max_q, responses.max_k) == (5, 7)
    # the same plan from the segments of two rows: row 1's positions start at T
    second_row = batch.segments.clone()
    second_row[:, 0] = 1
    plan = attention_plan(torch.cat([batch.segments, second_row]), row_length=32, num_rows=2)
    assert plan.calls[0].query_index.tolist() == [0, 1, 2, 10, 11, 32, 33, 34, 42, 43]
    # moving to where it is already is free: the same plan, no copy
    assert batch.to("cpu").attention_plan is batch.attention_plan
    # no groups (an empty filler row): no calls
    assert (
        collate_packed([], pad_id=0, shared_prompt=True, has_yref=True).attention_plan.calls == ()
    )


def test_backend_follows_device_dtype_and_head_size():
    from selm_mcore.mcore.attention import attention_backend, torch_varlen_function

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert torch_varlen_function() is not None  # torch 2.13 has torch.nn.attention.varlen
    assert attention_backend(cuda, torch.bfloat16, 128) == "varlen"
    assert attention_backend(cuda, torch.float16, 64) == "varlen"
    assert attention_backend(cpu, torch.bfloat16, 128) == "sdpa"
    assert attention_backend(cuda, torch.float32, 128) == "sdpa"  # FA2 takes fp16 / bf16 only
    assert attention_backend(cuda, torch.bfloat16, 12) == "sdpa"  # not a multiple of 8
    assert attention_backend(cuda, torch.bfloat16, 512) == "sdpa"  # over 256
