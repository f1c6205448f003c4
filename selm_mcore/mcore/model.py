"""Megatron-Core GPTModel in the Llama-3 layout, built from a Hugging Face config of a supported
family (llama, mistral, qwen2, phi3: ``selm_mcore.mcore.families`` says what each changes).

    ctx = init_parallel(tp=2, pp=2)
    models = build_model(hf_config, ctx)              # one GPTModel chunk per virtual stage
    logits = models[0](input_ids, position_ids)       # [B, T, V_padded / tp] on the last stage

Layout: RMSNorm, SwiGLU MLP (``linear_fc1`` = [gate; up]), grouped-query attention with a fused
``linear_qkv``, RoPE (non-interleaved, ``rope_theta``; scaling types "default", "linear" and
"llama3" with the config's own factors), no biases (Qwen2: q/k/v biases), tied or untied
embeddings, vocabulary padded to a multiple of ``make_vocab_size_divisible_by * tp``.
Transformer Engine's layer spec is used on GPU when TE imports, Megatron's local spec otherwise
(always on CPU); both keep the same dist-checkpoint keys. Configs outside this layout are
refused (``UnsupportedModelError``), as are layouts that do not divide (``ParallelLayoutError``).

Notes for callers:
* RoPE positions are always 0..T-1 (Megatron's GPTModel ignores ``position_ids`` for RoPE), so
  batches must be right-padded; padding is then excluded by the loss mask.
* Each chunk carries ``hf_config`` (the source config) and ``true_vocab_size``; the logits'
  columns >= true_vocab_size are padding.
* Megatron's own llama3 scaling hard-codes low/high frequency factors 1/4 and an original
  context of 8192; this module instead sets ``rotary_pos_emb.inv_freq`` from the config with
  the same formula as transformers (``rope_inv_freq``).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from selm_mcore.config.schema import RECOMPUTE_CHOICES
from selm_mcore.mcore.families import (
    UnsupportedModelError,
    check_family_config,
    transformer_overrides,
)
from selm_mcore.mcore.parallel import ParallelContext, ParallelLayoutError
from selm_mcore.modelspec import padded_vocab_size

logger = logging.getLogger(__name__)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# --- config helpers ---------------------------------------------------------------------------


def load_hf_config(hf_config_or_dir):
    """An HF config object from a config object, a dict or a folder holding config.json."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(hf_config_or_dir, PretrainedConfig):
        return hf_config_or_dir
    if isinstance(hf_config_or_dir, dict):
        values = dict(hf_config_or_dir)
        return AutoConfig.for_model(values.pop("model_type", "llama"), **values)
    path = os.fspath(hf_config_or_dir)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}/config.json not found: pass an HF model folder")
    return AutoConfig.from_pretrained(path)


def head_dim(hf_config) -> int:
    """Attention head size (``head_dim`` when set, else hidden_size / num_attention_heads)."""
    value = getattr(hf_config, "head_dim", None)
    return int(value) if value else hf_config.hidden_size // hf_config.num_attention_heads


def num_query_groups(hf_config) -> int:
    """Key/value heads (GQA groups); equals the attention heads when the config omits it."""
    return int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)


def rope_parameters(hf_config) -> dict[str, Any]:
    """The RoPE parameters as one dict with ``rope_type`` and ``rope_theta`` (transformers 4/5)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_type" not in params:
        params["rope_type"] = params.get("type", "default")
    return params


def rope_inv_freq(hf_config) -> torch.Tensor:
    """fp32 inverse RoPE frequencies [head_dim / 2] exactly as transformers computes them.

    "default": 1 / theta^(2i/d). "linear": divided by ``factor``. "llama3": wavelengths above
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, those
    below ``.../high_freq_factor`` are kept, and the band between is interpolated smoothly.
    """
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    dim = int(head_dim(hf_config) * params.get("partial_rotary_factor", 1.0))
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if rope_type == "default":
        return inv_freq
    factor = params["factor"]
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context_len = params["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise UnsupportedModelError(
        f"rope_parameters.rope_type={rope_type!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def validate_hf_config(hf_config) -> None:
    """Raise UnsupportedModelError unless the config is a supported family's plain decoder
    (``families.check_family_config``: model_type, MoE, biases, foreign features) with SwiGLU
    and RoPE over the whole head. A sliding window is checked against the run's lengths
    (``families.check_attention_window``), not here."""
    check_family_config(hf_config)
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(
            f"config.json hidden_act={act!r} is not supported: the SwiGLU MLP needs 'silu'"
        )
    params = rope_parameters(hf_config)
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"config.json rope scaling type {params['rope_type']!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            f"config.json partial_rotary_factor={params['partial_rotary_factor']} is not "
            "supported: RoPE must cover the whole head"
        )
    if hf_config.num_attention_heads % num_query_groups(hf_config) != 0:
        raise UnsupportedModelError(
            f"config.json num_attention_heads={hf_config.num_attention_heads} must be a multiple "
            f"of num_key_value_heads={num_query_groups(hf_config)}"
        )


def tp_options(hf_config, padded_vocab: int | None = None, max_tp: int = 64) -> list[int]:
    """Every tensor-parallel size <= max_tp that divides the heads, the query groups, the MLP
    width and the padded vocabulary: ``padded_vocab`` when it is fixed (a checkpoint's), else
    the vocabulary padded for that tp (``padded_vocab_size(vocab, tp)``, a multiple of tp)."""
    sizes = (
        hf_config.num_attention_heads,
        num_query_groups(hf_config),
        hf_config.intermediate_size,
    ) + ((padded_vocab,) if padded_vocab else ())
    return [tp for tp in range(1, max_tp + 1) if all(size % tp == 0 for size in sizes)]


def validate_layout(
    hf_config, tp: int, pp: int, vpp: int | None = None, padded_vocab: int | None = None
) -> None:
    """Raise ParallelLayoutError unless tp/pp/vpp divide the model's heads, groups and layers.

    ``padded_vocab``: the padded vocabulary when it is fixed (a checkpoint saved it); None when
    it is padded for ``tp`` (then it always divides). The tp hint lists only sizes that fit
    every rule at once (``tp_options``).
    """
    groups = num_query_groups(hf_config)
    checks = [
        (hf_config.num_attention_heads, "model.num_attention_heads", tp, "parallel.tp"),
        (groups, "model.num_key_value_heads (query groups)", tp, "parallel.tp"),
        (hf_config.intermediate_size, "model.intermediate_size", tp, "parallel.tp"),
        (
            hf_config.num_hidden_layers,
            "model.num_hidden_layers",
            pp * (vpp or 1),
            "parallel.pp*vpp" if vpp else "parallel.pp",
        ),
    ]
    if padded_vocab is not None:
        checks.append((padded_vocab, "padded_vocab_size", tp, "parallel.tp"))
    for total, what, parts, knob in checks:
        if total % parts != 0:
            if knob == "parallel.tp":
                options = tp_options(hf_config, padded_vocab)
            else:
                options = [d for d in range(1, total + 1) if total % d == 0 and d <= 64]
            raise ParallelLayoutError(
                f"{knob}={parts} must divide {what}={total}; choose one of {options}"
            )
    if padded_vocab is not None and padded_vocab < hf_config.vocab_size:
        raise ParallelLayoutError(
            f"padded_vocab_size={padded_vocab} is smaller than model.vocab_size="
            f"{hf_config.vocab_size}"
        )


# --- building ---------------------------------------------------------------------------------


RECOMPUTE_MODES = RECOMPUTE_CHOICES  # model.recompute's names


def _te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE fails with ImportError or OSError (missing cuDNN) when unusable
        return False
    return True


def _wgrad_fusion_available() -> bool:
    """Apex's ``fused_weight_gradient_mlp_cuda`` extension (built with --cuda_ext) imports.

    Megatron's own ColumnParallelLinear (the LM head in every spec, every linear in the local
    spec) refuses ``gradient_accumulation_fusion=True`` without it; TE's layers do not need it.
    """
    if not torch.cuda.is_available():
        return False
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def recompute_mode(recompute: str | bool | None) -> str:
    """The activation recompute choice as one of RECOMPUTE_MODES (true = "full", false or None =
    "none": the meaning of the former boolean ``model.recompute``)."""
    if recompute is None or recompute is False:
        return "none"
    if recompute is True:
        return "full"
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(
            f"model.recompute={recompute!r} must be one of "
            f"{', '.join(RECOMPUTE_MODES)} (or true = full, false = none)"
        )
    return recompute


def recompute_settings(recompute: str | bool | None) -> dict[str, Any]:
    """TransformerConfig fields of a recompute choice.

    none: every activation is kept. selective: Megatron's selective recompute of the core
    attention (the [b, heads, T, T] scores of the unfused local attention; TE's fused attention
    keeps no scores, so there it saves little). full: each layer keeps only its input and
    recomputes the rest in backward (uniform, one layer per unit): ~1/3 more compute.
    """
    mode = recompute_mode(recompute)
    if mode == "full":
        return dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


def transformer_config(
    hf_config,
    ctx: ParallelContext,
    *,
    params_dtype=torch.float32,
    recompute: str | bool = "none",
    use_te: bool | None = None,
    init_weights: bool = True,
    packed: bool = False,
    wgrad_fusion: bool | None = None,
):
    """Megatron TransformerConfig for the HF config (of a supported family) under ctx's layout.

    Sequence parallelism as ``ctx.sequence_parallel`` (``parallel.sequence_parallel``). On GPU:
    gradient accumulation fused into the weight-gradient GEMMs when apex's extension imports
    (``wgrad_fusion``; None = probe), batched p2p. On CPU all of these stay off.
    ``recompute``: "none", "selective" or "full" (``recompute_settings``; true = full).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = ctx.device.type == "cuda"
    use_te = _te_available() if use_te is None else use_te
    wgrad_fusion = _wgrad_fusion_available() if wgrad_fusion is None else wgrad_fusion
    if params_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"params_dtype={params_dtype} is not supported: use float32 or bfloat16")
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=num_query_groups(hf_config),
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=ctx.tp,
        pipeline_model_parallel_size=ctx.pp,
        virtual_pipeline_model_parallel_size=ctx.vpp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=init_weights,
        transformer_impl="transformer_engine" if use_te else "local",
        # Fused kernels need CUDA (and TE/apex); the unfused paths are the same maths.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        # TE's fused RoPE takes one position per row; packed rows carry positions per token.
        apply_rope_fusion=use_te and not packed,
        persist_layer_norm=False,
        # Needs apex's fused_weight_gradient_mlp_cuda: Megatron's ColumnParallelLinear (the LM
        # head in both specs) refuses the flag without it.
        gradient_accumulation_fusion=on_gpu and wgrad_fusion,
        sequence_parallel=ctx.sequence_parallel,
        # batch_p2p_comm=True gives wrong gradients with interleaved PP over gloo.
        batch_p2p_comm=on_gpu,
    )
    kwargs.update(recompute_settings(recompute))
    kwargs.update(transformer_overrides(hf_config))
    if on_gpu and not wgrad_fusion:
        logger.info(
            "gradient_accumulation_fusion off: apex's fused_weight_gradient_mlp_cuda "
            "extension is not installed (pip install apex with --cuda_ext to fuse "
            "the weight-gradient accumulation)"
        )
    return TransformerConfig(**kwargs)


def build_model(
    hf_config,
    ctx: ParallelContext,
    *,
    params_dtype=torch.float32,
    padded_vocab: int | None = None,
    recompute: str | bool = "none",
    make_vocab_size_divisible_by: int = 128,
    use_te: bool | None = None,
    init_weights: bool = True,
    packed: bool = False,
) -> list:
    """Build this rank's GPTModel chunks (one per virtual pipeline stage) for an HF config.

    Weights are randomly initialised (seeded by init_parallel; TP-invariant on CPU); load real
    weights with ``selm_mcore.mcore.weights.load_hf_weights`` or ``load_model_checkpoint``.
    ``padded_vocab`` overrides the padded vocabulary (e.g. the size a checkpoint was saved at).
    ``init_weights=False`` skips the random initialisation (weights are loaded right after).
    ``packed=True`` puts ``PackedAttention`` in the layer spec: the chunks then take packed
    micro-batches (``SelmGPTModel``'s packed forward; ``data.packing`` pack / shared_prompt).
    ``recompute``: "none", "selective" or "full" activation recompute (true = full).
    """
    hf_config = load_hf_config(hf_config)
    validate_hf_config(hf_config)
    # A vocabulary padded here for ctx.tp always divides; only a fixed one needs checking.
    validate_layout(hf_config, ctx.tp, ctx.pp, ctx.vpp, padded_vocab)
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(hf_config.vocab_size, ctx.tp, make_vocab_size_divisible_by)

    use_te = _te_available() if use_te is None else use_te
    config = transformer_config(
        hf_config,
        ctx,
        params_dtype=params_dtype,
        recompute=recompute,
        use_te=use_te,
        init_weights=init_weights,
        packed=packed,
    )
    layer_spec = _layer_spec(use_te=use_te, packed=packed)
    inv_freq = rope_inv_freq(hf_config).to(ctx.device)
    models = [
        _build_chunk(
            hf_config, ctx, vp_stage, config, layer_spec, padded_vocab, inv_freq, init_weights
        )
        for vp_stage in range(ctx.num_chunks)
    ]
    logger.info(
        "built %d Megatron chunk(s): %d layers, hidden %d, vocab %d (padded %d), tp=%d "
        "pp=%d vpp=%s, %s spec, %s",
        len(models),
        hf_config.num_hidden_layers,
        hf_config.hidden_size,
        hf_config.vocab_size,
        padded_vocab,
        ctx.tp,
        ctx.pp,
        ctx.vpp,
        "TE" if use_te else "local",
        params_dtype,
    )
    return models


def _layer_spec(*, use_te: bool, packed: bool) -> Any:
    """Megatron's Llama layer spec (``selm_mcore.mcore.layer_spec``): Transformer Engine's or
    the local one, with ``PackedAttention`` as the core attention for packed micro-batches."""
    from selm_mcore.mcore.layer_spec import gpt_layer_spec

    return gpt_layer_spec(use_te=use_te, packed=packed)


def _build_chunk(
    hf_config,
    ctx: ParallelContext,
    vp_stage: int,
    config,
    layer_spec,
    padded_vocab: int,
    inv_freq: torch.Tensor,
    init_weights: bool,
):
    """The model chunk of virtual pipeline stage ``vp_stage`` on this rank."""
    from selm_mcore.mcore.gpt import SelmGPTModel
    from selm_mcore.mcore.layer_spec import decoder_spec

    vp = vp_stage if ctx.vpp else None
    model = SelmGPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(layer_spec, config, vp_stage=vp, pp_rank=ctx.pp_rank),
        vocab_size=padded_vocab,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=_is_first_chunk(ctx, vp_stage),
        post_process=_is_last_chunk(ctx, vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(rope_parameters(hf_config)["rope_theta"]),
        vp_stage=vp,
    )
    # Megatron's llama3 scaling hard-codes its constants: use the config's frequencies.
    model.rotary_pos_emb.inv_freq = inv_freq.clone()
    model.hf_config = hf_config
    model.true_vocab_size = hf_config.vocab_size
    if not init_weights:
        _mark_tensor_parallel_weights(model)
    if ctx.device.type == "cuda":
        model.cuda(ctx.device)
    return model


def _mark_tensor_parallel_weights(model) -> None:
    """Set the tensor-parallel attributes Megatron skips when perform_initialization=False.

    Megatron's local layers mark their weights ``tensor_model_parallel`` only inside the random
    initialisation; without them the optimizer treats every weight shard as a TP replica, so the
    gradient norm (and clipping) only counts TP rank 0's shards.
    """
    from megatron.core.tensor_parallel import layers as tp_layers

    for module in model.modules():
        if isinstance(module, (tp_layers.ColumnParallelLinear, tp_layers.VocabParallelEmbedding)):
            partition_dim = 0
        elif isinstance(module, tp_layers.RowParallelLinear):
            partition_dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not getattr(weight, "tensor_model_parallel", False):
            tp_layers.set_tensor_model_parallel_attributes(weight, True, partition_dim, 1)


def _is_first_chunk(ctx: ParallelContext, vp_stage: int) -> bool:
    return ctx.pp_rank == 0 and vp_stage == 0


def _is_last_chunk(ctx: ParallelContext, vp_stage: int) -> bool:
    return ctx.pp_rank == ctx.pp - 1 and vp_stage == ctx.num_chunks - 1


def layers_of_stage(
    num_layers: int, pp: int, num_chunks: int, pp_rank: int, vp_stage: int
) -> list[int]:
    """Global layer indices of (pp_rank, vp_stage) under Megatron's even interleaved split."""
    per_slice = num_layers // (pp * num_chunks)
    start = (vp_stage * pp + pp_rank) * per_slice
    return list(range(start, start + per_slice))
