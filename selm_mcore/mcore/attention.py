"""Core attention for packed rows: sequences that never see each other, shared prompts.

``PackedAttention`` takes the place of Megatron's core attention (``DotProductAttention`` /
``TEDotProductAttention``) in the layer spec when ``data.packing`` is ``pack`` or
``shared_prompt``. Megatron hands it query [T, B, np, hn] and key/value [T, B, ng, hn] (this
rank's heads) and, in the ``attention_mask`` slot, the packed layout: the int64 CPU tensor
``segments`` [G, 6] of ``selm_mcore.data.packing`` (one row per group: row, start, prompt_len, r1,
r2, r3). It returns the context [T, B, np * hn]; padding positions get zeros.

The shared-prompt mask (response k sees the prompt and itself causally) is computed as two
kinds of causal attention, never as a dense [T, T] mask:

* each prompt (or, in ``pack``, each sequence) attends causally to itself;
* each response's queries attend to the keys [prompt; response] with the causal diagonal aligned
  to the bottom right (query i of the response sees all P prompt keys and response keys <= i).

Backends, chosen per call:

* ``flash`` (CUDA with the flash-attn package): two ``flash_attn_varlen_func`` calls per layer,
  the prompts and the responses, over gathered tokens. flash-attn aligns ``causal=True`` to the
  bottom right when seqlen_q != seqlen_k (its documented behaviour since 2.1), which is exactly
  the response mask, so no mask tensor and no log-sum-exp merge are needed; GQA is native.
* ``sdpa`` (CPU, or CUDA without flash-attn): ``torch.nn.functional.scaled_dot_product_attention``
  per group with a small [R, P + R] boolean mask for each response.

Why not the others: Transformer Engine's "arbitrary" mask type runs only in its unfused backend
(a dense [b, np, T, T] score tensor); FlexAttention needs torch.compile for speed and memory (its
eager path materialises the scores); THD packing with cu_seqlens (TE or flash) serves ``pack``
but cannot express a prompt shared by several responses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


@dataclass
class VarlenPlan:
    """Gather indices (into the flattened [B * T] tokens) and cumulative lengths of the two
    varlen attention calls; ``None`` parts are absent (no responses in ``pack``)."""

    prompt_index: torch.Tensor
    prompt_cu: torch.Tensor
    prompt_max: int
    query_index: torch.Tensor | None
    query_cu: torch.Tensor | None
    query_max: int
    key_index: torch.Tensor | None
    key_cu: torch.Tensor | None
    key_max: int


def varlen_plan(segments: torch.Tensor, row_length: int, device: torch.device) -> VarlenPlan:
    """The index plan of ``segments`` for rows of ``row_length`` tokens (see module docstring)."""
    prompt_index, prompt_lens = [], []
    query_index, query_lens, key_index, key_lens = [], [], [], []
    for row, start, prompt_len, *responses in segments.tolist():
        base = row * row_length + start
        prompt = list(range(base, base + prompt_len))
        prompt_index += prompt
        prompt_lens.append(prompt_len)
        offset = base + prompt_len
        for length in responses:
            if length == 0:
                continue
            response = list(range(offset, offset + length))
            query_index += response
            query_lens.append(length)
            key_index += prompt + response
            key_lens.append(prompt_len + length)
            offset += length

    def cumulative(lengths: list[int]) -> torch.Tensor:
        return (
            torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        )

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    has_responses = bool(query_lens)
    return VarlenPlan(
        prompt_index=index(prompt_index),
        prompt_cu=cumulative(prompt_lens),
        prompt_max=max(prompt_lens, default=0),
        query_index=index(query_index) if has_responses else None,
        query_cu=cumulative(query_lens) if has_responses else None,
        query_max=max(query_lens, default=0),
        key_index=index(key_index) if has_responses else None,
        key_cu=cumulative(key_lens) if has_responses else None,
        key_max=max(key_lens, default=0),
    )


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: VarlenPlan,
    scale: float,
    attend,
) -> torch.Tensor:
    """Context [B*T, np, hn] of flattened q [B*T, np, hn], k/v [B*T, ng, hn] through ``attend``
    (``flash_attn_varlen_func``'s signature: q, k, v, cu_q, cu_k, max_q, max_k, scale, causal);
    positions outside every group are zero."""
    out = query.new_zeros(query.shape)
    if plan.prompt_index.numel():
        q = query.index_select(0, plan.prompt_index)
        k = key.index_select(0, plan.prompt_index)
        v = value.index_select(0, plan.prompt_index)
        context = attend(
            q, k, v, plan.prompt_cu, plan.prompt_cu, plan.prompt_max, plan.prompt_max, scale, True
        )
        out = out.index_copy(0, plan.prompt_index, context)
    if plan.query_index is not None:
        assert plan.key_index is not None  # the response parts are all set or all None
        q = query.index_select(0, plan.query_index)
        k = key.index_select(0, plan.key_index)
        v = value.index_select(0, plan.key_index)
        context = attend(
            q, k, v, plan.query_cu, plan.key_cu, plan.query_max, plan.key_max, scale, True
        )
        out = out.index_copy(0, plan.query_index, context)
    return out


def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    """flash-attn's varlen kernel (bottom-right aligned causal mask)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=causal
    )


def sdpa_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    """The same contract as ``flash_varlen`` in plain torch, one sequence at a time (the
    reference the flash path is tested against, and the fallback without flash-attn)."""
    outputs = []
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cu_q) - 1):
        qs, ks, vs = (q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]])
        outputs.append(_sdpa_bottom_right(qs, ks, vs, scale))
    return torch.cat(outputs) if outputs else q.new_zeros(q.shape)


def _sdpa_bottom_right(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of q [L, np, hn] over k/v [S, ng, hn], S >= L, diagonal at the bottom
    right: query i sees keys j <= i + S - L."""
    length, keys = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    gqa = qt.shape[0] != kt.shape[0]
    if keys == length:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        mask = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(keys - length)
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
    return out.transpose(0, 1)


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


class PackedAttention(MegatronModule):
    """Megatron core attention over a packed layout (module docstring)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type=None,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **unused,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"PackedAttention has no attention dropout (got {dropout}); set "
                "attention_dropout=0 or data.packing=none"
            )
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("PackedAttention does not apply query-key layer scaling")
        self.use_flash: bool | None = None  # decided at the first call (device of the activations)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_mask is None or attention_mask.dtype != torch.long:
            raise ValueError(
                "PackedAttention needs the packed layout (int64 segments) in the "
                "attention_mask slot; pass PackedBatch.segments"
            )
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("PackedAttention takes neither attention_bias nor packed_seq_params")
        seq_len, batch, heads, head_dim = query.shape
        if self.use_flash is None:
            self.use_flash = query.is_cuda and _flash_available()
        plan = varlen_plan(attention_mask, seq_len, query.device)
        # [T, B, h, d] -> [B * T, h, d], the token order of the plan's indices
        q, k, v = (
            x.transpose(0, 1).reshape(batch * seq_len, x.shape[2], head_dim)
            for x in (query, key, value)
        )
        attend = flash_varlen if self.use_flash else sdpa_varlen
        context = varlen_attention(q, k, v, plan, self.softmax_scale, attend)
        return context.view(batch, seq_len, heads * head_dim).transpose(0, 1).contiguous()
