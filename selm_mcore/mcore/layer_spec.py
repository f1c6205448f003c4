"""Megatron layer specs of the Llama layout: Transformer Engine's, or the local one with a norm
that supports sequence parallelism, and ``PackedAttention`` for packed micro-batches.

    layer_spec = gpt_layer_spec(use_te=False, packed=True)
    spec = decoder_spec(layer_spec, config, vp_stage=None, pp_rank=0)   # GPTModel's layer spec

Megatron's local spec (every linear Megatron's own, no Transformer Engine: what a pip install of
torch gets) builds its norms with ``WrappedTorchNorm``, which refuses sequence parallelism and
creates the norm weights in fp32 whatever the parameter dtype (so under bf16 activations torch's
fused RMSNorm kernel, which needs one dtype, does not run). ``LocalNorm`` takes its place in
every norm slot of the local spec and as the decoder's final norm:

* torch's own ``RMSNorm`` / ``LayerNorm`` (``F.rms_norm``: on CPU in fp32 the very same maths);
* the weight in the model's parameter dtype (bf16 with model.dtype=bf16);
* the weight marked ``sequence_parallel`` (as Megatron's TE and Apex norms mark theirs): under
  sequence parallelism each tensor-parallel rank normalises T/tp positions, so the weight's
  gradient is partial per rank; Megatron's ``finalize_model_grads`` all-reduces the gradients of
  parameters so marked across the tensor-parallel group
  (``_allreduce_non_tensor_model_parallel_grads``), after which every rank holds the full
  gradient and the replicas stay equal.

Everything else of the local spec supports sequence parallelism as it is: the embedding scatters
the sequence, the column-parallel linears all-gather it, the row-parallel linears reduce-scatter
it, and the output layer gathers it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

NORM_CLASSES = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}


class LocalNorm:
    """Megatron's norm slot on the local spec (module docstring): builds torch's RMSNorm or
    LayerNorm (``config.normalization``) with its parameters in ``config.params_dtype``, marked
    ``sequence_parallel`` as ``config.sequence_parallel`` says."""

    def __new__(  # type: ignore[misc]  # returns the torch norm, as WrappedTorchNorm does
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError(
                "LocalNorm (the local spec's norm) supports neither "
                "layernorm_zero_centered_gamma nor memory_efficient_layer_norm"
            )
        norm_class = NORM_CLASSES.get(config.normalization)
        if norm_class is None:
            raise ValueError(
                f"normalization={config.normalization!r} is not one of {', '.join(NORM_CLASSES)}"
            )
        norm = norm_class(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _with_local_norms(spec: Any) -> Any:
    """``spec`` (a ModuleSpec tree) with every ``WrappedTorchNorm`` slot holding ``LocalNorm``."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return LocalNorm
    if isinstance(spec, ModuleSpec):
        spec.module = _with_local_norms(spec.module)
        spec.submodules = _with_local_norms(spec.submodules)
        return spec
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for field in dataclasses.fields(spec):
            setattr(spec, field.name, _with_local_norms(getattr(spec, field.name)))
    return spec


def gpt_layer_spec(*, use_te: bool, packed: bool) -> Any:
    """Megatron's Llama layer spec: Transformer Engine's, or the local one with ``LocalNorm``;
    with ``PackedAttention`` as the core attention for packed micro-batches."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        layer_spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    else:
        layer_spec = _with_local_norms(
            copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        )
    if packed:
        from selm_mcore.mcore.attention import PackedAttention

        layer_spec.submodules.self_attention.submodules.core_attention = PackedAttention
    return layer_spec


def uses_local_norm(layer_spec: Any) -> bool:
    return getattr(layer_spec.submodules, "input_layernorm", None) is LocalNorm


def decoder_spec(layer_spec: Any, config, *, vp_stage: int | None, pp_rank: int) -> Any:
    """What GPTModel takes as its layer spec for one model chunk: the local spec as the chunk's
    list of layers plus ``LocalNorm`` as the final norm (Megatron would pick WrappedTorchNorm for
    it); Transformer Engine's spec as it is (its final norm is TE's)."""
    if not uses_local_norm(layer_spec):
        return layer_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=LocalNorm)
