"""The model families selm-mcore trains, and what each changes from the Llama layout.

    family = family_of(hf_config)          # Family, or UnsupportedModelError naming model_type
    check_family_config(hf_config)         # refusals of a supported family's unsupported features
    check_attention_window(hf_config, max_length=1024, generation_context=2048)
    check_model_config_dir(hf_dir, max_length=1024)   # both, from config.json
    transformer_overrides(hf_config)       # TransformerConfig fields that differ from Llama's

Every supported family is the Llama decoder (RMSNorm, SwiGLU, grouped-query attention, RoPE,
no linear biases, tied or untied embeddings) with these differences:

| model_type | HF class          | differs from Llama                                          |
|------------|-------------------|-------------------------------------------------------------|
| llama      | LlamaForCausalLM  | (the base layout; rope scaling default, linear, llama3)     |
| mistral    | MistralForCausalLM| ``sliding_window``: allowed while every sequence fits it    |
| qwen2      | Qwen2ForCausalLM  | biases on q, k and v (Megatron ``add_qkv_bias``); a window  |
|            |                   | only with ``use_sliding_window`` (same rule as mistral)     |
| phi3       | Phi3ForCausalLM   | fused ``qkv_proj`` ([q; k; v] rows) and ``gate_up_proj``    |
|            |                   | ([gate; up] rows) in HF; ``longrope`` scaling refused       |

Sliding-window attention (each token sees the last ``sliding_window`` positions, itself
included) equals full causal attention while no sequence is longer than the window, so a
windowed model trains exactly as long as ``data.max_length`` and the generation context
(``generation.max_model_len``) fit the window; ``check_attention_window`` refuses anything
longer (``SlidingWindowError``) instead of training a different model than vLLM serves.

The name/layout maps of the fused and biased tensors are in ``selm_mcore.mcore.weights``
(driven by ``Family.fused_qkv``, ``Family.fused_gate_up`` and ``Family.qkv_bias``). Functions
here take an HF config object or a config.json dict, and import neither torch nor Megatron, so
the planner and the generation pre-checks use them too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.modelspec import config_getter
from selm_mcore.runtime.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    """The HF config describes a model (or a feature of one) outside the supported families."""


class SlidingWindowError(UnsupportedModelError):
    """A sliding attention window shorter than the sequences the run would feed the model."""


@dataclass(frozen=True)
class Family:
    """One supported HF architecture and how its layout differs from Llama's."""

    model_type: str
    architecture: str  # the HF class written into an exported config.json
    differences: str  # one line for docs and logs
    qkv_bias: bool = False  # q/k/v projections carry biases (Megatron add_qkv_bias)
    fused_qkv: bool = False  # HF holds one qkv_proj [q; k; v] instead of q/k/v_proj
    fused_gate_up: bool = False  # HF holds one gate_up_proj [gate; up]


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family("llama", "LlamaForCausalLM", "the base layout"),
        Family(
            "mistral",
            "MistralForCausalLM",
            "sliding_window allowed while data.max_length and generation.max_model_len fit it",
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "biases on q/k/v (add_qkv_bias); use_sliding_window as mistral's window",
            qkv_bias=True,
        ),
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "fused qkv_proj and gate_up_proj split/merged by the converters; no longrope",
            fused_qkv=True,
            fused_gate_up=True,
        ),
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# Keys of other architectures' features; a config of a supported family that sets one (a
# mislabelled or modified config.json) describes a model these layouts do not compute.
FOREIGN_FEATURES = {
    "attn_logit_softcapping": "attention logit soft-capping (Gemma-2)",
    "final_logit_softcapping": "final logit soft-capping (Gemma-2)",
    "query_pre_attn_scalar": "a query scale other than 1/sqrt(head_dim) (Gemma-2)",
    "use_qk_norm": "RMSNorm on queries and keys (Qwen3/Gemma-3 style)",
    "qk_layernorm": "LayerNorm on queries and keys",
    "use_parallel_residual": "parallel attention and MLP residuals",
}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def family_of(hf_config: Any) -> Family:
    """The Family of an HF config object or config.json dict; UnsupportedModelError otherwise."""
    model_type = config_getter(hf_config)("model_type")
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise UnsupportedModelError(
            f"config.json model_type={model_type!r} is not supported: selm-mcore trains the "
            f"families {', '.join(SUPPORTED_MODEL_TYPES)} (Llama-layout decoders; Gemma-style "
            "norms and mixture-of-experts models are not among them); start from a model of "
            "one of these families"
        )
    return family


def _rope_type(get) -> str:
    params = get("rope_parameters") or get("rope_scaling") or {}
    return str(params.get("rope_type", params.get("type", "default")))


def check_family_config(hf_config: Any) -> Family:
    """Refuse what the supported family of ``hf_config`` has but these layouts do not compute:
    mixture-of-experts, other architectures' features, linear biases the family lacks, Phi-3's
    longrope. Returns the Family. (RoPE types, activation and head counts: ``model.py``.)"""
    family = family_of(hf_config)
    get = config_getter(hf_config)
    for key in MOE_KEYS:
        if get(key):
            raise UnsupportedModelError(
                f"config.json {key}={get(key)} describes a mixture-of-experts model; only "
                f"dense {family.model_type} models are supported (pick a dense checkpoint)"
            )
    for key, feature in FOREIGN_FEATURES.items():
        if get(key):
            raise UnsupportedModelError(
                f"config.json {key}={get(key)!r} asks for {feature}, which the "
                f"{family.model_type} layout does not compute; remove the key or use a model "
                "without it"
            )
    for key in ("attention_bias", "mlp_bias"):
        if get(key, False):
            raise UnsupportedModelError(
                f"config.json {key}=true is not supported: the {family.model_type} layout has "
                "no such biases (use a model without linear biases)"
            )
    if family.model_type == "phi3" and _rope_type(get) in ("longrope", "su", "yarn"):
        raise UnsupportedModelError(
            f"config.json rope_scaling type {_rope_type(get)!r} (Phi-3's long-context "
            "models) is not supported: use a 4k-context Phi-3 (e.g. "
            "microsoft/Phi-3-mini-4k-instruct, no rope_scaling)"
        )
    return family


def attention_window(hf_config: Any) -> int | None:
    """The sliding attention window of the config, or None when every layer attends fully
    (Qwen2 sets ``sliding_window`` only with ``use_sliding_window``, and its ``layer_types``
    says which layers use it)."""
    get = config_getter(hf_config)
    window = get("sliding_window")
    if not window or (get("model_type") == "qwen2" and not get("use_sliding_window", False)):
        return None
    layer_types = get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def check_attention_window(
    hf_config: Any,
    *,
    max_length: int | None = None,
    generation_context: int | None = None,
    source: str = "config.json",
) -> None:
    """Raise SlidingWindowError when a sequence of ``max_length`` (data.max_length) or of
    ``generation_context`` (generation.max_model_len) tokens would not fit the model's sliding
    window: full causal attention computes it exactly only while every sequence fits."""
    window = attention_window(hf_config)
    if window is None:
        return
    for key, length in (
        ("data.max_length", max_length),
        ("generation.max_model_len", generation_context),
    ):
        if length is not None and length > window:
            raise SlidingWindowError(
                f"{source}: sliding_window={window} is shorter than {key}={length}. The "
                "Megatron model uses full causal attention, which equals the windowed "
                "attention only while every sequence fits the window; set "
                f"{key} <= {window} (--set {key}={window}), or use a model without a sliding "
                "window"
            )


def check_model_config_dir(
    config_dir: str | os.PathLike,
    *,
    max_length: int | None = None,
    generation_context: int | None = None,
) -> Family:
    """``check_family_config`` and ``check_attention_window`` for the config.json in
    ``config_dir`` (an HF folder, or a Megatron checkpoint's hf/ folder), named in the error:
    the start-of-command check of a run's model against its lengths."""
    path = Path(config_dir) / "config.json"
    config = json.loads(path.read_text())
    family = check_family_config(config)
    check_attention_window(
        config,
        max_length=max_length,
        generation_context=generation_context,
        source=str(path),
    )
    return family


def transformer_overrides(hf_config: Any) -> dict[str, Any]:
    """TransformerConfig fields of the family that differ from the Llama layout's."""
    return {"add_qkv_bias": family_of(hf_config).qkv_bias}
