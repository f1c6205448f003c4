"""Core attention for packed rows: sequences that never see each other, shared prompts.

``PackedAttention`` takes the place of Megatron's core attention (``DotProductAttention`` /
``TEDotProductAttention``) in the layer spec when ``data.packing`` is ``pack`` or
``shared_prompt``. Megatron hands it query [T, B, np, hn] and key/value [T, B, ng, hn] (this
rank's heads) and, in the ``packed_seq_params`` slot, ``PackedLayout``: Megatron's
``PackedSeqParams`` (format ``sbhd``, which Megatron passes through untouched, also under
activation recompute) carrying the micro-batch's ``AttentionPlan``
(``selm_mcore.data.attention_plan``), built once at collation. It returns the context
[T, B, np * hn]; padding positions get zeros.

The shared-prompt mask (response k sees the prompt and itself causally) is two variable-length
causal attention calls over gathered tokens, never a dense [T, T] mask: the prompts (each
attends to itself) and the responses (queries of response k, keys [prompt; response k], the
causal diagonal at the bottom right). Backends, chosen at the first call from the device:

* ``varlen`` (CUDA, stock torch >= 2.10): ``torch.nn.attention.varlen.varlen_attn``
  (FlashAttention-2 kernels inside torch, bottom-right aligned causal mask when query and key
  lengths differ, grouped-query attention native). Its signature changed between releases
  (``is_causal`` first, then ``window_size=(-1, 0)``; ``scale`` and ``enable_gqa`` arrived on
  the way; torch 2.13 has all but ``is_causal``): ``varlen_adapter`` reads the installed one.
* ``flash`` (CUDA without torch's varlen, with the flash-attn package): ``flash_attn_varlen_func``,
  the same kernels and the same bottom-right alignment (flash-attn >= 2.1).
* ``sdpa`` (CPU, or CUDA with neither, or fp32 activations / head sizes the FlashAttention-2
  kernels do not take): ``scaled_dot_product_attention`` per sequence with a small [L, P + L]
  boolean mask for each response; the lengths come from the plan's Python tuples.

Why not the others: Transformer Engine's "arbitrary" mask type runs only in its unfused backend
(a dense [b, np, T, T] score tensor); FlexAttention needs torch.compile for speed and memory (its
eager path materialises the scores); THD packing with cu_seqlens (TE or flash) serves ``pack``
but cannot express a prompt shared by several responses without the gathered keys used here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from selm_mcore.data.attention_plan import AttentionPlan, VarlenCall

FLASH_DTYPES = (torch.float16, torch.bfloat16)

# attend(q, k, v, call, scale) -> context of the call's queries [Tq, np, hn]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VarlenCall, float], torch.Tensor]


@dataclass
class PackedLayout(PackedSeqParams):
    """Megatron's packed-sequence slot carrying the micro-batch's ``AttentionPlan``."""

    plan: AttentionPlan | None = None


def packed_layout(plan: AttentionPlan) -> PackedLayout:
    return PackedLayout(qkv_format="sbhd", plan=plan)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: AttentionPlan,
    scale: float,
    attend: Attend,
) -> torch.Tensor:
    """Context [R*T, np, hn] of flattened q [R*T, np, hn], k/v [R*T, ng, hn]: each of the plan's
    calls gathers its queries and keys, ``attend`` runs it, the context goes back to the query
    positions; positions outside every call are zero."""
    out = query.new_zeros(query.shape)
    for call in plan.calls:
        q = query.index_select(0, call.query_index)
        k = key.index_select(0, call.key_index)
        v = value.index_select(0, call.key_index)
        out = out.index_copy(0, call.query_index, attend(q, k, v, call, scale))
    return out


# --- backends ---------------------------------------------------------------------------------


def varlen_adapter(varlen_attn: Callable) -> Attend:
    """``attend`` through a function with the contract of ``torch.nn.attention.varlen.
    varlen_attn`` in whichever signature it has (module docstring); the scale is folded into the
    queries where the function takes none."""
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal: dict = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        raise RuntimeError(
            f"{varlen_attn.__module__}.varlen_attn takes neither window_size nor is_causal: an "
            "unknown torch release; update selm_mcore.mcore.attention.varlen_adapter"
        )
    takes_scale, takes_gqa = "scale" in params, "enable_gqa" in params

    def attend(q, k, v, call: VarlenCall, scale: float) -> torch.Tensor:
        kwargs = dict(causal)
        if takes_gqa and q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        if takes_scale:
            kwargs["scale"] = scale
        elif not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-12):
            q = q * (scale * math.sqrt(q.shape[-1]))  # the default scale is 1/sqrt(hn)
        return varlen_attn(q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, **kwargs)

    return attend


def flash_attend(q, k, v, call: VarlenCall, scale: float) -> torch.Tensor:
    """flash-attn's varlen kernel (bottom-right aligned causal mask, GQA native)."""
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, softmax_scale=scale, causal=True
    )


def sdpa_attend(q, k, v, call: VarlenCall, scale: float) -> torch.Tensor:
    """The same contract in plain torch, one sequence at a time (the CPU path, and the fallback
    on CUDA without varlen kernels); lengths from the plan's tuples, no device sync."""
    outputs = []
    q_start = k_start = 0
    for q_len, k_len in zip(call.query_lengths, call.key_lengths):
        outputs.append(
            _sdpa_bottom_right(
                q[q_start : q_start + q_len],
                k[k_start : k_start + k_len],
                v[k_start : k_start + k_len],
                scale,
            )
        )
        q_start, k_start = q_start + q_len, k_start + k_len
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


def torch_varlen_function() -> Callable | None:
    """``torch.nn.attention.varlen.varlen_attn`` where this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """``varlen``, ``flash`` or ``sdpa`` for activations of ``dtype`` on ``device`` (module
    docstring); the FlashAttention-2 kernels take fp16 / bf16 and head sizes up to 256 in
    multiples of 8, anything else runs the SDPA path."""
    if device.type != "cuda" or dtype not in FLASH_DTYPES or head_dim % 8 or head_dim > 256:
        return "sdpa"
    if torch_varlen_function() is not None:
        return "varlen"
    return "flash" if flash_attn_installed() else "sdpa"


def backend_attend(backend: str) -> Attend:
    if backend == "varlen":
        function = torch_varlen_function()
        assert function is not None  # attention_backend checked it
        return varlen_adapter(function)
    if backend == "flash":
        return flash_attend
    if backend == "sdpa":
        return sdpa_attend
    raise ValueError(f"attention backend {backend!r} is not one of varlen, flash, sdpa")


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
        self.backend: str | None = None  # decided at the first call (device of the activations)
        self._attend: Attend | None = None

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
        plan = getattr(packed_seq_params, "plan", None)
        if not isinstance(plan, AttentionPlan):
            raise ValueError(
                "PackedAttention needs the packed layout in the packed_seq_params slot: "
                "packed_layout(PackedBatch.attention_plan)"
            )
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("PackedAttention takes neither an attention_mask nor a bias")
        seq_len, batch, heads, head_dim = query.shape
        if (plan.num_rows, plan.row_length) != (batch, seq_len):
            raise ValueError(
                f"the attention plan is for {plan.num_rows} row(s) of {plan.row_length} tokens, "
                f"the activations have {batch} of {seq_len}"
            )
        if self._attend is None:
            self.backend = attention_backend(query.device, query.dtype, head_dim)
            self._attend = backend_attend(self.backend)
        # [T, B, h, d] -> [B * T, h, d], the token order of the plan's indices
        q, k, v = (
            x.transpose(0, 1).reshape(batch * seq_len, x.shape[2], head_dim)
            for x in (query, key, value)
        )
        context = varlen_attention(q, k, v, plan, self.softmax_scale, self._attend)
        return context.view(batch, seq_len, heads * head_dim).transpose(0, 1).contiguous()
