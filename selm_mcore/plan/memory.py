"""The planner's memory model: bytes on one GPU (or CPU rank) for one TP/PP/VPP/DP layout.

Static state (exact, Megatron-Core 0.16.1's own bookkeeping replayed):

* parameters: Megatron DDP's contiguous parameter buffer (``use_distributed_optimizer``), one per
  dtype: every parameter starts on a multiple of 64 elements, every bucket ends on a multiple of
  lcm(dp, 128); a tied embedding gets a bucket of its own. ``e`` bytes per element (2 in bf16);
  the local spec's RMSNorm weights stay fp32 (a buffer of their own).
* gradients: the same layout in fp32 (``grad_reduce_in_fp32=True``): 4 bytes per element.
* optimizer: the distributed optimizer's shard of every bucket (1/dp of it, padding excluded):
  Adam m and v in fp32, plus an fp32 master copy when the parameters are bf16 (12 or 8 bytes
  per element), plus one 4-byte step tensor per parameter shard.

Activations (bytes saved for backward, per layer, for a micro-batch of n tokens in rows of T;
e = activation bytes, t = tp, sp = t with sequence parallelism else 1, h hidden, q = heads *
head_dim, kv = groups * head_dim, f = FFN width, a = heads / t; ``layer_bytes``):

    norms + linear inputs   local (GPU)  2 * (h e + 4 + h e)          RMSNorm input + rstd, the
                            te           2 * (h e + 4 + h e) / sp     next linear's input
                            cpu          2 * (8 h + 4 + h e)          torch's unfused RMSNorm
                                                                      keeps x and x/rms in fp32
    RoPE cos/sin            4 * head_dim * e per row position (fused on TE, unpacked: 0)
    attention output        q e / t                                   linear_proj's input
    SwiGLU MLP              3 f e / t (fused: fc1 output + fc2 input); cpu 5 f e / t (unfused)
    core attention          ``attention_bytes`` (the backend and the packed layout decide)

With ``model.recompute`` = full a layer keeps only its input (n h e / sp) and one layer is
recomputed at a time (its norm keeps that same input); selective keeps everything but the core
attention, which keeps its q, k (after RoPE) and the fused qkv output instead. Megatron's pipeline
schedule holds several micro-batches (and model chunks) in flight on the first stages
(``in_flight_chunks``). The last stage adds the LM head (``head_bytes``): the final norm, the head's
input, the logits of the head positions (packed: response positions only) kept by the log-prob
kernel, and 8 bytes of kernel statistics per position.

``working_bytes`` estimates the transient peak on top (the gradients of one layer in backward,
the output layer's weight-gradient temporary, a non-in-place logits gradient); it is not checked
on CPU (see docs/plan.md). ``save_buffer_bytes``: a step checkpoint in the fully reshardable
format all-gathers each bucket's fp32 state on the GPU, one state at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from selm_mcore.config.schema import RECOMPUTE_CHOICES
from selm_mcore.modelspec import ModelShape

IMPLS = ("te", "local", "cpu")
RECOMPUTE = RECOMPUTE_CHOICES
SAVE_FORMATS = ("fully_reshardable", "dp_reshardable")
GiB_BYTES = 2**30


@dataclass(frozen=True)
class Layout:
    """One parallel layout and recompute choice."""

    tp: int
    pp: int
    vpp: int | None
    dp: int
    recompute: str = "none"
    sequence_parallel: bool = False

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def layers_per_chunk(self, model: ModelShape) -> int:
        return model.num_layers // (self.pp * self.chunks)

    def label(self) -> str:
        vpp = f" vpp{self.vpp}" if self.vpp else ""
        return f"tp{self.tp} pp{self.pp}{vpp} dp{self.dp}"


@dataclass(frozen=True)
class Group:
    """One packed attention group: a prompt attending causally to itself and its responses,
    each attending to the prompt and causally to itself (``pack``: a sequence, no responses)."""

    prompt: int
    responses: tuple[int, ...] = ()


@dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch looks like to the layers: ``rows`` rows of ``row_length`` tokens,
    ``head_positions`` rows through the LM head, packed ``groups`` (None: causal rows)."""

    rows: int
    row_length: int
    head_positions: int
    groups: tuple[Group, ...] | None = None

    @property
    def tokens(self) -> int:
        return self.rows * self.row_length

    @property
    def packed(self) -> bool:
        return self.groups is not None


# --- static state: parameters, gradients, optimizer --------------------------------------------


def chunk_parameters(
    model: ModelShape, layout: Layout, pp_rank: int, chunk: int
) -> list[tuple[int, bool, bool]]:
    """(numel, own bucket, is a norm weight) of the parameters of one model chunk on one TP
    rank, in ``module.parameters()`` order (embedding, layers, final norm, output layer)."""
    t, h = layout.tp, model.hidden_size
    vocab = model.padded_vocab(t)
    first = pp_rank == 0 and chunk == 0
    last = pp_rank == layout.pp - 1 and chunk == layout.chunks - 1
    params: list[tuple[int, bool, bool]] = []
    if first:
        params.append((vocab // t * h, model.tied_embeddings, False))
    layer = [
        (h, True),
        (model.query_dim * h // t, False),
        ((model.query_dim + 2 * model.kv_dim) * h // t, False),
        (h, True),
        (2 * model.ffn_hidden_size * h // t, False),
        (model.ffn_hidden_size * h // t, False),
    ]
    for _ in range(layout.layers_per_chunk(model)):
        params += [(numel, False, norm) for numel, norm in layer]
    if last:
        params.append((h, False, True))
        if not model.tied_embeddings:
            params.append((vocab // t * h, False, False))
        elif layout.pp > 1:  # the last stage's copy of a tied embedding
            params.append((vocab // t * h, True, False))
    return params


def buffer_layout(
    params: list[tuple[int, bool]], dp: int, bucket_size: int | None
) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """Megatron's DDP buffer (``_ParamAndGradBuffer`` with the distributed optimizer): the
    (start, end, bucket) of every parameter and the (start, end) of every bucket."""

    def pad(value: int, divisor: int) -> int:
        return -(-value // divisor) * divisor

    bucket_divisor = math.lcm(dp, 128)
    ranges: list[tuple[int, int, int]] = []
    buckets: list[tuple[int, int]] = []
    bucket_start = start = end = 0
    open_bucket = False
    for numel, own_bucket in reversed(params):  # Megatron walks them in reverse (backprop) order
        start = pad(start, 64)
        if own_bucket and open_bucket:
            buckets.append((bucket_start, pad(start, bucket_divisor)))
            bucket_start = start = buckets[-1][1]
        end = start + numel
        ranges.append((start, end, len(buckets)))
        open_bucket = True
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            buckets.append((bucket_start, pad(end, bucket_divisor)))
            bucket_start = start = buckets[-1][1]
            open_bucket = False
        else:
            start = end
    if open_bucket:
        buckets.append((bucket_start, pad(end, bucket_divisor)))
    return ranges, buckets


def shard_numels(
    ranges: list[tuple[int, int, int]], buckets: list[tuple[int, int]], dp: int
) -> list[tuple[int, int]]:
    """Per DP rank: (elements of its optimizer shard, parameters it holds a piece of)."""
    out = []
    for rank in range(dp):
        numel = pieces = 0
        for start, end, bucket in ranges:
            b_start, b_end = buckets[bucket]
            size = (b_end - b_start) // dp
            lo, hi = b_start + rank * size, b_start + (rank + 1) * size
            overlap = min(end, hi) - max(start, lo)
            if overlap > 0:
                numel += overlap
                pieces += 1
        out.append((numel, pieces))
    return out


def static_bytes(
    model: ModelShape,
    layout: Layout,
    pp_rank: int,
    *,
    param_bytes: int,
    bucket_size: int | None,
    fp32_norms: bool = False,
    dp_rank: int | None = None,
) -> dict[str, int]:
    """Parameters, fp32 gradients, optimizer state (DP rank ``dp_rank``'s shard, default the
    largest) and the largest bucket (elements) of one rank of pipeline stage ``pp_rank``.
    ``fp32_norms``: the norm
    weights are fp32 whatever the dtype (Megatron's local spec builds torch.nn.RMSNorm without
    a dtype), so DDP keeps them in a buffer of their own and the optimizer needs no master copy.
    """
    params = grads = largest_bucket = 0
    shards = [0] * layout.dp
    for chunk in range(layout.chunks):
        # Chunks after the first have no bucketing (Megatron's rule for interleaving).
        size = bucket_size if chunk == 0 else None
        chunk_params = chunk_parameters(model, layout, pp_rank, chunk)
        split = fp32_norms and param_bytes != 4
        groups = (
            [
                (param_bytes, [(n, own) for n, own, norm in chunk_params if not norm]),
                (4, [(n, own) for n, own, norm in chunk_params if norm]),
            ]
            if split
            else [(param_bytes, [(n, own) for n, own, _ in chunk_params])]
        )
        for dtype_bytes, group in groups:
            if not group:
                continue
            ranges, buckets = buffer_layout(group, layout.dp, size)
            numel = buckets[-1][1]
            params += numel * dtype_bytes
            grads += numel * 4
            master = 4 if dtype_bytes != 4 else 0  # an fp32 copy of bf16/fp16 parameters
            for rank, (n, pieces) in enumerate(shard_numels(ranges, buckets, layout.dp)):
                shards[rank] += n * (8 + master) + 4 * pieces
            largest_bucket = max(largest_bucket, max(end - start for start, end in buckets))
    return {
        "params": params,
        "grads": grads,
        "optimizer": max(shards) if dp_rank is None else shards[dp_rank],
        "largest_bucket": largest_bucket,
    }


def ddp_bucket_size(dp: int, overlap: bool) -> int | None:
    """Megatron's default bucket size: one bucket without overlap, else max(40M, 1M * dp)."""
    return max(40_000_000, 1_000_000 * dp) if overlap else None


# --- activations -------------------------------------------------------------------------------


def attention_bytes(model: ModelShape, layout: Layout, impl: str, mb: MicroBatch, e: int) -> int:
    """Bytes the core attention of one layer saves for backward.

    Packed (``PackedAttention``): the gathered q/k/v of two varlen calls (prompts; responses
    over [prompt; response] keys) and their int64 indices; flash-attn (GPU) keeps q, k, v, the
    output and an fp32 log-sum-exp per query and head; torch's math SDPA on CPU keeps, per
    group, fp32 q, k^T and v (k, v expanded to every head) and the [L, S] probabilities, plus the
    gathered q. Unpacked: Megatron's DotProductAttention keeps q, k^T, v (expanded), the fp32
    softmax (and its cast to e) and the bool mask; TE's fused attention keeps q, k, the qkv
    output, the output and the fp32 statistics.
    """
    t = layout.tp
    heads, hd = model.num_heads // t, model.head_dim
    q, kv = model.query_dim // t, model.kv_dim // t
    groups = mb.groups
    if groups is None:
        b, s = mb.rows, mb.row_length
        if impl == "te":
            return mb.tokens * (e * (q + kv) + e * (q + 2 * kv) + e * q + 4 * heads)
        probs = 4 + (e if e != 4 else 0)
        return 3 * b * heads * s * hd * e + b * heads * s * s * probs + s * s
    prompts = sum(g.prompt for g in groups)
    queries = sum(sum(g.responses) for g in groups)
    keys = sum(g.prompt * len(g.responses) + sum(g.responses) for g in groups)
    indices = 8 * (prompts + queries + keys)
    if impl == "cpu":
        per_group = 0
        for g in groups:
            calls = [(g.prompt, g.prompt)] + [(r, g.prompt + r) for r in g.responses if r]
            per_group += sum(
                4 * heads * (length * hd + 2 * span * hd + length * span) for length, span in calls
            )
        return per_group + e * q * (prompts + queries) + indices
    return (
        e * (2 * q * (prompts + queries) + 2 * kv * (prompts + keys))
        + 4 * heads * (prompts + queries)
        + indices
    )


def layer_bytes(
    model: ModelShape, layout: Layout, impl: str, mb: MicroBatch, e: int, recompute: str = "none"
) -> int:
    """Bytes one transformer layer saves for backward under ``recompute`` (module docstring)."""
    t, h = layout.tp, model.hidden_size
    sp = t if layout.sequence_parallel else 1
    n = mb.tokens
    if recompute == "full":
        return n * h * e // sp
    if impl == "cpu":
        boundary = 2 * (8 * h + 4 + h * e)
    else:
        boundary = 2 * (2 * h * e + 4) // sp
    rope = 0 if (impl == "te" and not mb.packed) else 4 * model.head_dim * e * mb.row_length
    mlp = (5 if impl == "cpu" else 3) * model.ffn_hidden_size * e // t
    body = n * (boundary + model.query_dim * e // t + mlp) + rope
    if recompute == "selective":
        q, kv = model.query_dim // t, model.kv_dim // t
        return body + n * e * (q + kv + q + 2 * kv)
    return body + attention_bytes(model, layout, impl, mb, e)


def in_flight_chunks(layout: Layout, num_microbatches: int, pp_rank: int) -> int:
    """(micro-batch, model chunk) activations the schedule holds at once on ``pp_rank``:
    1F1B keeps min(m, pp - rank) micro-batches; interleaving keeps its warm-up
    (pp - rank - 1) * 2 + (vpp - 1) * pp chunk-forwards plus one."""
    if layout.pp == 1:
        return 1
    if not layout.vpp:
        return min(num_microbatches, layout.pp - pp_rank)
    warmup = (layout.pp - pp_rank - 1) * 2 + (layout.vpp - 1) * layout.pp
    return min(num_microbatches * layout.vpp, warmup + 1)


def head_bytes(model: ModelShape, layout: Layout, impl: str, mb: MicroBatch, e: int) -> int:
    """Last stage, one micro-batch: final norm, the LM head's input, the logits of the head
    positions (kept by the log-prob kernel) and its 8 bytes of statistics per position."""
    t, h = layout.tp, model.hidden_size
    sp = t if layout.sequence_parallel else 1
    n, m = mb.tokens, mb.head_positions
    norm = n * (8 * h + 4) if impl == "cpu" else n * (h * e + 4) // sp
    head_input = m * (h * e + 8) if mb.packed else n * h * e // sp
    logits = m * model.padded_vocab(t) // t * e
    return norm + head_input + logits + 8 * m


def activation_bytes(
    model: ModelShape,
    layout: Layout,
    impl: str,
    mb: MicroBatch,
    e: int,
    *,
    num_microbatches: int,
    pp_rank: int,
) -> dict[str, int]:
    """The tensors saved for backward on one rank of stage ``pp_rank``: "layers" (the layers of
    the micro-batches in flight), "embedding" (token ids, first stage), "head" (the LM head,
    last stage), "recompute" (the layer, or with selective the core attention, recomputed in
    backward: it exists only after the head's backward, so the peak holds the larger of the
    two) and "saved_peak" = layers + embedding + max(head, recompute)."""
    units = in_flight_chunks(layout, num_microbatches, pp_rank)
    per_chunk = layout.layers_per_chunk(model)
    layers = units * per_chunk * layer_bytes(model, layout, impl, mb, e, layout.recompute)
    recompute = 0
    if layout.recompute == "full":
        layers += units * 4 * model.head_dim * mb.row_length  # the shared fp32 RoPE angles
        # the recomputed layer's norm keeps the checkpointed input itself (not on CPU in bf16,
        # where torch's RMSNorm keeps an fp32 copy)
        shared_input = (
            0 if (impl == "cpu" and e != 4) else layer_bytes(model, layout, impl, mb, e, "full")
        )
        recompute = layer_bytes(model, layout, impl, mb, e, "none") - shared_input
    elif layout.recompute == "selective":
        recompute = attention_bytes(model, layout, impl, mb, e)
    head = head_bytes(model, layout, impl, mb, e) if pp_rank == layout.pp - 1 else 0
    embedding = 8 * mb.tokens * units if pp_rank == 0 else 0
    return {
        "layers": layers,
        "embedding": embedding,
        "head": head,
        "recompute": recompute,
        "saved_peak": layers + embedding + max(head, recompute),
    }


def working_bytes(
    model: ModelShape, layout: Layout, impl: str, mb: MicroBatch, e: int, last_stage: bool
) -> dict[str, int]:
    """Transient estimates on top of the saved tensors: "layer" (one layer's activation
    gradients in backward) and, on the last stage, "head" (the larger of a non-in-place logits
    gradient, unpacked, and the output layer's weight-gradient temporary, which TE's
    gradient-accumulation fusion avoids)."""
    layer = layer_bytes(model, layout, impl, mb, e, "none")
    if not last_stage:
        return {"layer": layer, "head": 0}
    t = layout.tp
    logits_grad = 0 if mb.packed else mb.tokens * model.padded_vocab(t) // t * e
    wgrad = 0 if impl == "te" else model.padded_vocab(t) // t * model.hidden_size * e
    return {"layer": layer, "head": max(logits_grad, wgrad)}


def transient_bytes(acts: dict[str, int], working: dict[str, int]) -> int:
    """What the backward adds on top of the saved layers and the LM head at its peak: the
    head's backward (its gradients) or a layer's (the recomputed part and its gradients)."""
    return max(working["head"], acts["recompute"] + working["layer"] - acts["head"])


def save_buffer_bytes(largest_bucket: int, save_format: str) -> int:
    """GPU bytes a step checkpoint's optimizer save allocates: fully_reshardable all-gathers
    one fp32 state of a bucket over DP at a time; dp_reshardable copies shards to the host."""
    return 4 * largest_bucket if save_format == "fully_reshardable" else 0


# --- one rank ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankMemory:
    """Bytes of one rank by component: parameters, fp32 gradients, its optimizer shard, the
    saved activations (layers in flight + token ids), the LM head's saved tensors ("logits"),
    the transient backward working set, a step checkpoint's save buffer and ``saved_peak``, the
    tensors saved for backward at their peak (``activation_bytes``)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    working: int
    save_buffer: int
    saved_peak: int

    @property
    def peak(self) -> int:
        """state + max(activations + logits + working, save buffer)."""
        state = self.params + self.grads + self.optimizer
        return state + max(self.activations + self.logits + self.working, self.save_buffer)

    def table(self) -> dict[str, int]:
        """The planner's columns (``selm plan``), peak last."""
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "logits": self.logits,
            "working": self.working,
            "save_buffer": self.save_buffer,
            "peak": self.peak,
        }


def rank_memory(
    model: ModelShape,
    layout: Layout,
    impl: str,
    mb: MicroBatch,
    e: int,
    *,
    pp_rank: int,
    num_microbatches: int,
    bucket_size: int | None,
    dp_rank: int | None = None,
    save_format: str = "",
) -> RankMemory:
    """One rank of pipeline stage ``pp_rank`` (DP rank ``dp_rank``, default the one with the
    largest optimizer shard) training micro-batches like ``mb`` with ``e``-byte parameters;
    ``save_format``: the optimizer format of step checkpoints ("": none are saved)."""
    static = static_bytes(
        model,
        layout,
        pp_rank,
        param_bytes=e,
        bucket_size=bucket_size,
        fp32_norms=False,  # LocalNorm (selm_mcore.mcore.layer_spec): the parameter dtype
        dp_rank=dp_rank,
    )
    acts = activation_bytes(
        model, layout, impl, mb, e, num_microbatches=num_microbatches, pp_rank=pp_rank
    )
    working = working_bytes(model, layout, impl, mb, e, pp_rank == layout.pp - 1)
    return RankMemory(
        params=static["params"],
        grads=static["grads"],
        optimizer=static["optimizer"],
        activations=acts["layers"] + acts["embedding"],
        logits=acts["head"],
        working=transient_bytes(acts, working),
        save_buffer=(
            save_buffer_bytes(static["largest_bucket"], save_format) if save_format else 0
        ),
        saved_peak=acts["saved_peak"],
    )
