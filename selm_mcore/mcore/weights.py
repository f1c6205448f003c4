"""HF <-> Megatron weights: the name/layout maps, streaming load from HF, streaming export.

    load_hf_weights(models, hf_dir, ctx)        # each rank reads only its TP/PP slices
    for name, tensor in iter_hf_weights(models, ctx): ...   # full HF tensors, yielded on rank 0
    export_hf(models, ctx, out_dir, aux_dir)    # an HF folder that transformers and vLLM load

Layout maps (Llama, HF -> Megatron, per layer):
  input_layernorm            -> input_layernorm (local spec) | linear_qkv.layer_norm_weight (TE)
  q_proj, k_proj, v_proj     -> linear_qkv, rows interleaved per query group:
                                [q heads of group 0; k_0; v_0; q heads of group 1; k_1; v_1; ...],
                                TP rank r holds groups [r*G/tp, (r+1)*G/tp)
  o_proj                     -> linear_proj (row parallel: columns split over TP)
  post_attention_layernorm   -> pre_mlp_layernorm | linear_fc1.layer_norm_weight (TE)
  gate_proj, up_proj         -> linear_fc1 = [gate shard r; up shard r] on TP rank r
  down_proj                  -> linear_fc2 (row parallel)
  embed_tokens / lm_head     -> embedding.word_embeddings / output_layer, vocab rows split over
                                TP and padded with zero rows up to the padded vocabulary; padding
                                is stripped on export. Tied models export no lm_head.
Family additions (``selm_mcore.mcore.families``):
  qwen2: q_proj/k_proj/v_proj.bias -> linear_qkv.bias, interleaved per query group as the rows
  phi3:  qkv_proj ([q; k; v] rows)  -> linear_qkv, split into q, k, v by row offsets on load and
                                       re-joined on export; gate_up_proj ([gate; up] rows) ->
                                       linear_fc1 the same way

Streaming and memory: HF safetensors are read tensor by tensor with positioned reads of only
this rank's rows (no memory map), copied straight into the parameters; the exporter gathers
one tensor at a time and writes it at once (safetensors headers are planned from the config, so
no shard is buffered; the file reader and writer: ``selm_mcore.runtime.weight_files``). Peak
resident memory per rank, measured on SmolLM2-135M (fp32, 538 MB of weights; a process with
torch + Megatron imported takes ~0.48 GB before any weight):
  hf_to_mcore  ~ 0.48 GB + 1.0 x (model bytes / (tp*pp)) + ~0.2 GB of dist-checkpoint save
  mcore_to_hf  ~ 0.48 GB + 1.0 x (model bytes / (tp*pp)) + the SwiGLU fc1 weights (Megatron
               merges the [gate; up] halves into new tensors on load: ~0.4 of a Llama's bytes)
so a model is never held twice; spread a large one over more local ranks with tp/pp
(``selm_mcore.mcore.convert``). The Megatron checkpoint folder is ``selm_mcore.mcore.checkpoint``'s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from selm_mcore.mcore.families import family_of
from selm_mcore.mcore.model import head_dim, layers_of_stage, load_hf_config, num_query_groups
from selm_mcore.mcore.parallel import ParallelContext
from selm_mcore.runtime.files import checksum_files, list_files, write_checksums
from selm_mcore.runtime.weight_files import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    WeightsError,
)

logger = logging.getLogger(__name__)

# Tokenizer and generation files copied along with the weights (whichever exist).
HF_AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


# --- the parameter table: one row per Megatron parameter, in HF order -------------------------


@dataclass(frozen=True)
class ParamSpec:
    """A Megatron parameter and the HF tensor(s) it holds."""

    part: str  # embedding | output | final_norm | input_norm | qkv | qkv_bias | proj | ...
    layer: int | None  # global 0-based layer, None outside the decoder layers
    kind: str  # vocab | qkv | fc1 | row | replicated  (how it is split over TP)
    hf_names: tuple[str, ...]  # qkv: q, k, v or one fused [q; k; v]; fc1: gate, up or [gate; up]
    hf_shapes: tuple[tuple[int, ...], ...]
    pp_rank: int  # owning pipeline stage
    chunk: int  # owning virtual stage on that pipeline rank


_Row = tuple[str, str, tuple[str, ...], tuple[tuple[int, ...], ...]]  # part, kind, names, shapes


def _layer_rows(hf_config, layer: int) -> list[_Row]:
    h, f = hf_config.hidden_size, hf_config.intermediate_size
    heads, groups, hd = (
        hf_config.num_attention_heads,
        num_query_groups(hf_config),
        head_dim(hf_config),
    )
    family = family_of(hf_config)
    p = f"model.layers.{layer}."
    attn = p + "self_attn."
    q_k_v: tuple[tuple[int, ...], ...] = ((heads * hd,), (groups * hd,), (groups * hd,))
    qkv: tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]
    fc1: tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]
    if family.fused_qkv:
        qkv = ((attn + "qkv_proj.weight",), (((heads + 2 * groups) * hd, h),))
    else:
        qkv = (tuple(attn + f"{x}_proj.weight" for x in "qkv"), tuple((*s, h) for s in q_k_v))
    if family.fused_gate_up:
        fc1 = ((p + "mlp.gate_up_proj.weight",), ((2 * f, h),))
    else:
        fc1 = ((p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), ((f, h), (f, h)))
    rows: list[_Row] = [
        ("input_norm", "replicated", (p + "input_layernorm.weight",), ((h,),)),
        ("qkv", "qkv", *qkv),
    ]
    if family.qkv_bias:
        rows.append(("qkv_bias", "qkv", tuple(attn + f"{x}_proj.bias" for x in "qkv"), q_k_v))
    return rows + [
        ("proj", "row", (attn + "o_proj.weight",), ((h, heads * hd),)),
        ("post_norm", "replicated", (p + "post_attention_layernorm.weight",), ((h,),)),
        ("fc1", "fc1", *fc1),
        ("fc2", "row", (p + "mlp.down_proj.weight",), ((h, f),)),
    ]


def param_table(hf_config, pp: int, num_chunks: int) -> list[ParamSpec]:
    """Every Megatron parameter of the model with its HF tensors and owner, in HF order.

    The untied output layer is listed (lm_head); with tied embeddings the output layer is the
    embedding and is not listed.
    """
    v, h, n = hf_config.vocab_size, hf_config.hidden_size, hf_config.num_hidden_layers
    first, last = (0, 0), (pp - 1, num_chunks - 1)
    owner = {}
    for pp_rank in range(pp):
        for chunk in range(num_chunks):
            for layer in layers_of_stage(n, pp, num_chunks, pp_rank, chunk):
                owner[layer] = (pp_rank, chunk)
    table = [
        ParamSpec("embedding", None, "vocab", ("model.embed_tokens.weight",), ((v, h),), *first)
    ]
    for layer in range(n):
        for part, kind, names, shapes in _layer_rows(hf_config, layer):
            table.append(ParamSpec(part, layer, kind, names, shapes, *owner[layer]))
    table.append(
        ParamSpec("final_norm", None, "replicated", ("model.norm.weight",), ((h,),), *last)
    )
    if not getattr(hf_config, "tie_word_embeddings", False):
        table.append(ParamSpec("output", None, "vocab", ("lm_head.weight",), ((v, h),), *last))
    return table


def _layer_param(layer, part: str) -> torch.nn.Parameter:
    """A decoder layer's parameter by part name, for the local and the TE layer specs."""
    attn, mlp = layer.self_attention, layer.mlp
    if part == "input_norm":
        fused = getattr(attn.linear_qkv, "layer_norm_weight", None)
        return fused if fused is not None else layer.input_layernorm.weight
    if part == "post_norm":
        fused = getattr(mlp.linear_fc1, "layer_norm_weight", None)
        return fused if fused is not None else layer.pre_mlp_layernorm.weight
    if part == "qkv_bias":
        return attn.linear_qkv.bias
    return {
        "qkv": attn.linear_qkv,
        "proj": attn.linear_proj,
        "fc1": mlp.linear_fc1,
        "fc2": mlp.linear_fc2,
    }[part].weight


def _local_param(models: Sequence, spec: ParamSpec) -> torch.nn.Parameter:
    chunk = models[spec.chunk]
    if spec.part == "embedding":
        return chunk.embedding.word_embeddings.weight
    if spec.part == "output":
        return chunk.output_layer.weight
    if spec.part == "final_norm":
        return chunk.decoder.final_layernorm.weight
    for layer in chunk.decoder.layers:
        if layer.layer_number - 1 == spec.layer:
            return _layer_param(layer, spec.part)
    raise RuntimeError(
        f"layer {spec.layer} is not in chunk {spec.chunk} of this pipeline rank (it holds "
        f"{[lay.layer_number - 1 for lay in chunk.decoder.layers]}): Megatron's layer split "
        "differs from selm_mcore.mcore.model.layers_of_stage"
    )


def hf_config_of(models: Sequence):
    hf_config = getattr(models[0], "hf_config", None)
    if hf_config is None:
        raise ValueError("models must come from selm_mcore.mcore.model.build_model (no hf_config)")
    return hf_config


# --- loading: this rank's slices of the HF tensors ----------------------------------------------


def _qkv_sources(spec: ParamSpec, hf_config) -> list[tuple[str, tuple[int, ...], int]]:
    """(HF name, its full shape, first row) of the q, k and v rows of a qkv spec: three
    tensors, or row ranges of one fused [q; k; v] tensor (Phi-3's qkv_proj)."""
    if len(spec.hf_names) == 3:
        return [(name, shape, 0) for name, shape in zip(spec.hf_names, spec.hf_shapes)]
    q_rows = hf_config.num_attention_heads * head_dim(hf_config)
    kv_rows = num_query_groups(hf_config) * head_dim(hf_config)
    name, shape = spec.hf_names[0], spec.hf_shapes[0]
    return [(name, shape, 0), (name, shape, q_rows), (name, shape, q_rows + kv_rows)]


def _fc1_sources(spec: ParamSpec) -> list[tuple[str, tuple[int, ...], int]]:
    """(HF name, its full shape, first row) of the gate and up rows: two tensors, or the two
    halves of one fused [gate; up] tensor (Phi-3's gate_up_proj)."""
    if len(spec.hf_names) == 2:
        return [(name, shape, 0) for name, shape in zip(spec.hf_names, spec.hf_shapes)]
    name, shape = spec.hf_names[0], spec.hf_shapes[0]
    return [(name, shape, 0), (name, shape, shape[0] // 2)]


def read_local_shard(
    reader: SafetensorsReader, spec: ParamSpec, hf_config, tp: int, tp_rank: int, out: torch.Tensor
) -> torch.Tensor:
    """Fill ``out`` (this TP rank's Megatron parameter ``spec``) from the HF tensors.

    Each HF slice is read and copied into its place in ``out`` at once, so the only transient
    memory is one slice (no concatenated copies). Returns ``out``.
    """
    names, shapes = spec.hf_names, spec.hf_shapes
    if spec.kind == "replicated":
        out.copy_(reader.read(names[0], shapes[0]))
    elif spec.kind == "row":
        cols = shapes[0][1] // tp
        part = slice(tp_rank * cols, (tp_rank + 1) * cols)
        out.copy_(reader.read(names[0], shapes[0], cols=part))
    elif spec.kind == "fc1":
        rows = out.shape[0] // 2  # this rank's gate (and up) rows
        for half, (name, shape, first) in zip(out.chunk(2), _fc1_sources(spec)):
            start = first + tp_rank * rows
            half.copy_(reader.read(name, shape, rows=slice(start, start + rows)))
    elif spec.kind == "qkv":
        hd = head_dim(hf_config)
        groups = num_query_groups(hf_config)
        per_group = hf_config.num_attention_heads // groups
        local_groups = groups // tp
        g0, g1 = tp_rank * local_groups, (tp_rank + 1) * local_groups
        view = out.view(local_groups, per_group + 2, hd, *out.shape[1:])
        (q_name, q_shape, q0), *kv = _qkv_sources(spec, hf_config)
        q_rows = slice(q0 + g0 * per_group * hd, q0 + g1 * per_group * hd)
        view[:, :per_group].copy_(
            reader.read(q_name, q_shape, rows=q_rows).view(view[:, :per_group].shape)
        )
        for i, (name, shape, first) in zip((per_group, per_group + 1), kv):
            kv_rows = slice(first + g0 * hd, first + g1 * hd)
            view[:, i].copy_(reader.read(name, shape, rows=kv_rows).view(view[:, i].shape))
    elif spec.kind == "vocab":
        vocab, local_rows = shapes[0][0], out.shape[0]
        start = tp_rank * local_rows
        stop = min(start + local_rows, vocab)
        out.zero_()
        if stop > start:
            out[: stop - start].copy_(reader.read(names[0], shapes[0], rows=slice(start, stop)))
    else:
        raise AssertionError(spec.kind)
    return out


_CONFIG_KEYS_MUST_MATCH = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


def check_same_architecture(model_config, hf_dir: Path) -> None:
    dir_config = load_hf_config(hf_dir)
    for key in _CONFIG_KEYS_MUST_MATCH:
        a, b = getattr(model_config, key, None), getattr(dir_config, key, None)
        if key == "num_key_value_heads":
            a, b = num_query_groups(model_config), num_query_groups(dir_config)
        if a != b:
            raise WeightsError(
                f"{hf_dir}/config.json has {key}={b} but the model was built with {key}={a}; "
                "build the model from the same config.json"
            )


def load_hf_weights(models: Sequence, hf_dir: str | os.PathLike, ctx: ParallelContext) -> None:
    """Copy HF safetensors weights into this rank's Megatron chunks (only its slices are read).

    Raises WeightsError naming the file/tensor when a shard file or tensor is missing, a shape
    does not match, or the folder's config.json describes another architecture.
    """
    hf_dir = Path(hf_dir)
    hf_config = hf_config_of(models)
    check_same_architecture(hf_config, hf_dir)
    reader = SafetensorsReader(hf_dir)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    specs = [s for s in param_table(hf_config, ctx.pp, ctx.num_chunks) if s.pp_rank == ctx.pp_rank]
    last_chunk = models[-1]
    if (
        tied
        and ctx.is_last_stage
        and getattr(last_chunk, "output_layer", None) is not None
        and last_chunk.output_layer.weight is not None
    ):
        # The last stage's copy of a tied embedding (pipeline parallel): load it from the
        # embedding, as Megatron's embedding-group all-reduce would.
        embed = param_table(hf_config, ctx.pp, ctx.num_chunks)[0]
        specs.append(
            ParamSpec(
                "output",
                None,
                "vocab",
                embed.hf_names,
                embed.hf_shapes,
                ctx.pp_rank,
                ctx.num_chunks - 1,
            )
        )
    written = set()
    with torch.no_grad():
        for spec in specs:
            param = _local_param(models, spec)
            written.add(id(param))
            read_local_shard(reader, spec, hf_config, ctx.tp, ctx.tp_rank, param.data)
    unset = [
        name for model in models for name, p in model.named_parameters() if id(p) not in written
    ]
    if unset:
        raise WeightsError(
            f"no HF tensor maps to the Megatron parameter(s) {unset} of this "
            "layer spec; extend selm_mcore.mcore.weights.param_table"
        )
    logger.info(
        "loaded %d HF tensors from %s (tp rank %d, pp rank %d)",
        sum(len(s.hf_names) for s in specs),
        hf_dir,
        ctx.tp_rank,
        ctx.pp_rank,
    )


# --- export: full HF tensors, streamed -------------------------------------------------------


def split_full(spec: ParamSpec, shards: list[torch.Tensor], hf_config) -> list[torch.Tensor]:
    """HF tensors of ``spec`` from its TP shards (ordered by TP rank)."""
    if spec.kind == "replicated":
        return [shards[0]]
    if spec.kind == "row":
        return [torch.cat(shards, dim=1)]
    if spec.kind == "vocab":
        return [torch.cat(shards)[: spec.hf_shapes[0][0]]]
    if spec.kind == "fc1":
        halves = [s.chunk(2) for s in shards]
        gate, up = torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])
        return [gate, up] if len(spec.hf_names) == 2 else [torch.cat([gate, up])]
    if spec.kind == "qkv":
        hd = head_dim(hf_config)
        groups = num_query_groups(hf_config)
        per_group = hf_config.num_attention_heads // groups
        trailing = shards[0].shape[1:]
        full = torch.cat(shards).view(groups, per_group + 2, hd, *trailing)
        q_k_v = [
            full[:, :per_group].reshape(-1, *trailing),
            full[:, per_group].reshape(-1, *trailing),
            full[:, per_group + 1].reshape(-1, *trailing),
        ]
        return q_k_v if len(spec.hf_names) == 3 else [torch.cat(q_k_v)]
    raise AssertionError(spec.kind)


def iter_hf_weights(models: Sequence, ctx: ParallelContext) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for the whole model on global rank 0, one tensor at a time.

    Every rank must iterate this generator to the end: ranks other than 0 yield nothing but take
    part in the TP all-gathers and the pipeline sends (data-parallel replicas other than the
    first return at once). Tensors are on ``ctx.device`` in the parameter dtype, vocabulary
    padding stripped, HF order (embed_tokens, layers, norm, lm_head when untied); some alias
    the parameters (norm weights at TP1), so copy a tensor to keep it past a training step.
    """
    if ctx.dp_rank != 0:
        return
    hf_config = hf_config_of(models)
    dtype = next(models[0].parameters()).dtype
    stage0_rank = dist.get_global_rank(ctx.pp_group, 0) if ctx.pp > 1 else 0
    for spec in param_table(hf_config, ctx.pp, ctx.num_chunks):
        tensors = None
        if ctx.pp_rank == spec.pp_rank:
            local = _local_param(models, spec).detach()
            if ctx.tp > 1 and spec.kind != "replicated":
                shards = [torch.empty_like(local) for _ in range(ctx.tp)]
                dist.all_gather(shards, local.contiguous(), group=ctx.tp_group)
            else:
                shards = [local]
            if ctx.tp_rank == 0:
                tensors = split_full(spec, shards, hf_config)
                if ctx.pp_rank != 0:
                    for tensor in tensors:
                        dist.send(tensor.contiguous(), dst=stage0_rank, group=ctx.pp_group)
        elif ctx.pp_rank == 0 and ctx.tp_rank == 0:
            src = dist.get_global_rank(ctx.pp_group, spec.pp_rank)
            tensors = [
                torch.empty(shape, dtype=dtype, device=ctx.device) for shape in spec.hf_shapes
            ]
            for tensor in tensors:
                dist.recv(tensor, src=src, group=ctx.pp_group)
        if ctx.rank == 0:
            assert tensors is not None  # global rank 0 is pipeline stage 0, TP rank 0
            yield from zip(spec.hf_names, tensors)


def export_plan(hf_config) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every exported tensor, in the order iter_hf_weights yields them."""
    return [
        (name, shape)
        for spec in param_table(hf_config, 1, 1)
        for name, shape in zip(spec.hf_names, spec.hf_shapes)
    ]


def write_hf_config_files(
    hf_config, out_dir: Path, aux_dir: Path | None, dtype: torch.dtype | None = None
) -> None:
    """config.json (dtype set, architectures: the family's HF class, e.g. LlamaForCausalLM) +
    tokenizer/generation files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = hf_config.to_diff_dict()
    config.pop("_name_or_path", None)
    config["architectures"] = [family_of(hf_config).architecture]
    if dtype is not None:
        config["dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
        config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if aux_dir is not None:
        for name in HF_AUX_FILES:
            if (Path(aux_dir) / name).is_file():
                shutil.copyfile(Path(aux_dir) / name, out_dir / name)
        if not (out_dir / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(hf_config).save_pretrained(str(out_dir))


def export_hf(
    models: Sequence,
    ctx: ParallelContext,
    out_dir: str | os.PathLike,
    aux_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the model as an HF folder with checksums.json (rank 0 writes; every rank calls
    this)."""
    hf_config = hf_config_of(models)
    dtype = next(models[0].parameters()).dtype
    out_dir = Path(out_dir)
    writer = None
    if ctx.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = [(name, shape, dtype) for name, shape in export_plan(hf_config)]
        writer = StreamingSafetensorsWriter(out_dir, plan, max_shard_bytes)
    for name, tensor in iter_hf_weights(models, ctx):
        assert writer is not None  # only rank 0 is given tensors
        writer.write(name, tensor)
        del tensor
    if writer is not None:
        writer.close()
        write_hf_config_files(hf_config, out_dir, Path(aux_dir) if aux_dir else None, dtype)
        write_checksums(out_dir, checksum_files(out_dir, list_files(out_dir)))
        logger.info(
            "wrote HF folder %s (%d file(s), %.1f MB)",
            out_dir,
            len(writer.files),
            writer.total_bytes / 1e6,
        )
    if dist.is_initialized() and ctx.world_size > 1:
        dist.barrier()
