"""The planner's layouts, workload and step-time model.

``enumerate_layouts`` lists every TP/PP/VPP/DP layout that divides the model (TP divides the
heads, the query groups, the FFN width and the padded vocabulary and stays inside a node; PP *
VPP divides the layers) and the global batch, times each recompute choice. ``plan_layout``
prices one of them: the memory of its first and last pipeline stage (``selm_mcore.plan.memory``)
and an estimated step time:

    compute    model FLOPs of one micro-batch per stage (2 * weights * tokens + causal
               attention; x3 for forward + backward, +1 forward of the layers with full
               recompute, +1 attention forward with selective) / (tp * peak * MFU)
    TP         4 all-reduces of [n, h] per layer and micro-batch (2 forward, 2 backward; +2 with
               full recompute) + the LM head input's, ring volume 2 (tp-1)/tp, over NVLink
    PP         the activation and its gradient per micro-batch and model chunk, over NVLink
               inside a node, InfiniBand when the pipeline spans nodes
    bubble     (pp - 1) / vpp micro-batch times per step (1F1B)
    DP         reduce-scatter of the fp32 gradients + all-gather of the parameters,
               (dp - 1)/dp * params * (4 + e) bytes, over NVLink or InfiniBand, not overlapped
    optimizer  ~34 bytes of HBM traffic per parameter of the DP shard

    step = (micro-batches + bubble) * (compute + TP + PP per micro-batch) + DP + optimizer
    pairs/s = global batch / step

The reference log-probs are assumed precomputed (``train.reference_mode=precomputed``, as in the
examples): the reference pass is not in the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from selm_mcore.modelspec import ModelShape, causal_pairs, packed_group_pairs
from selm_mcore.plan import memory
from selm_mcore.plan.memory import GiB_BYTES, Group, Layout, MicroBatch, RankMemory


@dataclass(frozen=True)
class Hardware:
    """What the step-time model and the fit test assume about the machine."""

    gpu_mem_gib: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # H100/H200 SXM dense bf16
    mfu: float = 0.40  # of the peak, for the model FLOPs
    nvlink_gbs: float = 360.0  # NCCL bus bandwidth inside a node (H100 SXM, NVLink 4)
    ib_gbs: float = 45.0  # per GPU across nodes (8 x 400 Gb/s NDR per node)
    hbm_gbs: float = 3350.0
    headroom: float = 0.10  # of gpu_mem kept free: CUDA context, NCCL, fragmentation

    def describe(self) -> str:
        return (
            f"{self.gpu_mem_gib:g} GiB per GPU ({self.headroom:.0%} kept free), "
            f"{self.gpus_per_node} GPUs per node; compute at {self.mfu:.0%} MFU of "
            f"{self.peak_tflops:g} TFLOP/s; NVLink {self.nvlink_gbs:g} GB/s, InfiniBand "
            f"{self.ib_gbs:g} GB/s per GPU, HBM {self.hbm_gbs:g} GB/s"
        )


@dataclass(frozen=True)
class Workload:
    """One optimizer step's work, from a config (``from_config``)."""

    packing: str  # shared_prompt / pack / none
    sequences: int  # per pair: 2, or 3 with y_ref (loss.alpha > 0)
    global_batch: int  # pairs per step
    prompt_tokens: int  # a typical pair (throughput)
    response_tokens: int
    budget: int  # packed: tokens per micro-batch; none: padded length T
    micro_batch_size: int = 1  # none: pairs per micro-batch
    param_bytes: int = 2
    save_interval: int = 0
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_config(
        cls, cfg, *, prompt_tokens: int | None = None, response_tokens: int | None = None
    ) -> Workload:
        """The config's batch, lengths and packing. A typical pair has ``prompt_tokens`` /
        ``response_tokens`` (default: half of max_prompt_length / of the response room);
        data.pack_tokens=0 (the longest pair of the data) is sized as its worst case,
        S * max_length."""
        data = cfg.data
        sequences = 3 if cfg.loss.alpha > 0 else 2
        multiple = data.pad_to_multiple_of
        prompt = prompt_tokens or data.max_prompt_length // 2
        response = response_tokens or (data.max_length - data.max_prompt_length) // 2
        notes = [
            f"a typical pair: {prompt} prompt + {sequences} x {response} response tokens "
            f"(--prompt-tokens / --response-tokens)"
        ]
        if data.packing == "none":
            budget = -(-data.max_length // multiple) * multiple
            notes.append(
                f"packing none: {cfg.train.micro_batch_size} pairs x {sequences} rows "
                f"of {budget} tokens per micro-batch (max_length, padded)"
            )
        elif data.pack_tokens:
            budget = data.pack_tokens
            notes.append(f"packing {data.packing}: micro-batches of data.pack_tokens={budget}")
        else:
            budget = -(-sequences * data.max_length // multiple) * multiple
            notes.append(
                f"packing {data.packing}, data.pack_tokens=0: sized for the longest "
                f"possible pair, {sequences} x max_length = {budget} tokens"
            )
        shared = data.packing == "shared_prompt"
        pair = prompt + sequences * response if shared else sequences * (prompt + response)
        if data.packing != "none" and pair > budget:
            raise ValueError(
                f"data.pack_tokens={budget} is smaller than a typical pair ({pair} tokens: "
                f"{prompt} prompt + {sequences} x {response} response tokens); raise "
                "data.pack_tokens or pass smaller --prompt-tokens / --response-tokens"
            )
        return cls(
            packing=data.packing,
            sequences=sequences,
            global_batch=cfg.train.global_batch_size,
            prompt_tokens=prompt,
            response_tokens=response,
            budget=budget,
            micro_batch_size=cfg.train.micro_batch_size,
            param_bytes=2 if cfg.model.dtype == "bf16" else 4,
            save_interval=cfg.train.save_interval,
            notes=tuple(notes),
        )

    @property
    def packed(self) -> bool:
        return self.packing != "none"

    def pair_tokens(self) -> int:
        responses = self.sequences * self.response_tokens
        if self.packing == "shared_prompt":
            return self.prompt_tokens + responses
        return self.sequences * self.prompt_tokens + responses

    def pairs_per_micro_batch(self) -> int:
        if not self.packed:
            return self.micro_batch_size
        return max(1, self.budget // self.pair_tokens())

    def micro_batch(self) -> MicroBatch:
        """A full micro-batch: a packed row of ``budget`` tokens filled with typical pairs, or
        micro_batch_size * S padded rows."""
        k = self.pairs_per_micro_batch()
        if not self.packed:
            rows = k * self.sequences
            return MicroBatch(rows=rows, row_length=self.budget, head_positions=rows * self.budget)
        p, r, s = self.prompt_tokens, self.response_tokens, self.sequences
        if self.packing == "shared_prompt":
            groups = tuple(Group(p, (r,) * s) for _ in range(k))
        else:
            groups = tuple(Group(p + r) for _ in range(k * s))
        return MicroBatch(rows=1, row_length=self.budget, head_positions=k * s * r, groups=groups)

    def micro_batches_per_step(self, dp: int) -> int:
        return math.ceil(self.global_batch / dp / self.pairs_per_micro_batch())


def layer_forward_flops(model: ModelShape, mb: MicroBatch) -> tuple[float, float]:
    """(dense, attention) FLOPs of one layer's forward over a micro-batch, counted as
    ``selm_mcore.modelspec.packed_forward_flops`` / ``forward_flops`` count them."""
    dense = 2 * model.layer_matmul_params() * mb.tokens
    if mb.groups is not None:
        pairs = sum(packed_group_pairs(g.prompt, g.responses) for g in mb.groups)
    else:
        pairs = mb.rows * causal_pairs(mb.row_length)
    return float(dense), float(4 * model.query_dim * pairs)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(
    model: ModelShape,
    workload: Workload,
    gpus: int,
    gpus_per_node: int,
    *,
    impl: str,
    max_vpp: int = 4,
    recompute: tuple[str, ...] = memory.RECOMPUTE,
) -> list[Layout]:
    """Every valid layout of ``gpus`` GPUs (module docstring) times each recompute choice."""
    layouts = []
    for tp in divisors(gpus):
        # (the padded vocabulary is a multiple of tp by construction)
        if tp > gpus_per_node or any(
            x % tp for x in (model.num_heads, model.num_kv_heads, model.ffn_hidden_size)
        ):
            continue
        for pp in divisors(gpus // tp):
            if model.num_layers % pp:
                continue
            dp = gpus // (tp * pp)
            if workload.global_batch % (dp * (1 if workload.packed else workload.micro_batch_size)):
                continue
            vpps = [None] + [
                v for v in range(2, max_vpp + 1) if pp > 1 and model.num_layers % (pp * v) == 0
            ]
            for vpp in vpps:
                for choice in recompute:
                    layouts.append(
                        Layout(
                            tp=tp,
                            pp=pp,
                            vpp=vpp,
                            dp=dp,
                            recompute=choice,
                            sequence_parallel=impl != "cpu" and tp > 1,
                        )
                    )
    return layouts


@dataclass
class PlanRow:
    """One priced layout: memory of its worst stage (GiB) and the step estimate."""

    layout: Layout
    memory_gib: dict[str, float]
    peak_gib: float
    fits: bool
    step_s: float
    pairs_per_s: float
    time_s: dict[str, float]
    mark: str = ""


def stage_memory(
    model: ModelShape,
    layout: Layout,
    workload: Workload,
    impl: str,
    pp_rank: int,
    *,
    overlap: bool,
    save_format: str,
) -> RankMemory:
    """Bytes of one rank of pipeline stage ``pp_rank`` running the workload's full
    micro-batches (``selm_mcore.plan.memory.rank_memory``)."""
    return memory.rank_memory(
        model,
        layout,
        impl,
        workload.micro_batch(),
        workload.param_bytes,
        pp_rank=pp_rank,
        num_microbatches=workload.micro_batches_per_step(layout.dp),
        bucket_size=memory.ddp_bucket_size(layout.dp, overlap),
        save_format=save_format if workload.save_interval else "",
    )


def step_time(
    model: ModelShape, layout: Layout, workload: Workload, hw: Hardware, params_per_rank: int
) -> dict[str, float]:
    """The step-time estimate of the module docstring, by component (seconds)."""
    mb = workload.micro_batch()
    e = workload.param_bytes
    rate = layout.tp * hw.peak_tflops * 1e12 * hw.mfu
    dense, attention = layer_forward_flops(model, mb)
    extra = {"none": 0.0, "selective": attention, "full": dense + attention}[layout.recompute]
    layers = model.num_layers // layout.pp
    head = 2.0 * model.hidden_size * model.vocab_size * mb.head_positions
    compute = (layers * (3 * (dense + attention) + extra) + 3 * head) / rate
    activation = mb.tokens * model.hidden_size * e
    tp_ops = 4 + (2 if layout.recompute == "full" else 0)
    ring = 2 * (layout.tp - 1) / layout.tp
    tp = (
        ring
        * (layers * tp_ops * activation + mb.head_positions * model.hidden_size * e)
        / (hw.nvlink_gbs * 1e9)
    )
    multi_node = layout.world > hw.gpus_per_node
    pp_link = hw.ib_gbs if multi_node else hw.nvlink_gbs
    pp = 0.0 if layout.pp == 1 else 2 * activation * layout.chunks / (pp_link * 1e9)
    m = workload.micro_batches_per_step(layout.dp)
    bubble = (layout.pp - 1) / layout.chunks
    dp_link = hw.ib_gbs if layout.tp * layout.dp > hw.gpus_per_node else hw.nvlink_gbs
    dp = (
        (layout.dp - 1) / layout.dp * params_per_rank * (4 + e) / (dp_link * 1e9)
        if layout.dp > 1
        else 0.0
    )
    optimizer = params_per_rank / layout.dp * 34 / (hw.hbm_gbs * 1e9)
    per_mb = compute + tp + pp
    total = (m + bubble) * per_mb + dp + optimizer
    return {
        "compute": m * compute,
        "tp_comm": m * tp,
        "pp_comm": m * pp,
        "bubble": bubble * per_mb,
        "dp_comm": dp,
        "optimizer": optimizer,
        "step": total,
        "micro_batches": float(m),
    }


def plan_layout(
    model: ModelShape,
    layout: Layout,
    workload: Workload,
    hw: Hardware,
    *,
    impl: str,
    overlap: bool = True,
    save_format: str = "fully_reshardable",
) -> PlanRow:
    """Memory of the worst of the first and last stage, and the step estimate."""
    stages = sorted({0, layout.pp - 1})
    per_stage = [
        stage_memory(model, layout, workload, impl, r, overlap=overlap, save_format=save_format)
        for r in stages
    ]
    worst = max(per_stage, key=lambda parts: parts.peak)
    params_per_rank = max(p.params for p in per_stage) // workload.param_bytes
    times = step_time(model, layout, workload, hw, params_per_rank)
    memory_gib = {key: value / GiB_BYTES for key, value in worst.table().items()}
    peak = memory_gib["peak"]
    return PlanRow(
        layout=layout,
        memory_gib=memory_gib,
        peak_gib=peak,
        fits=peak <= hw.gpu_mem_gib * (1 - hw.headroom),
        step_s=times["step"],
        pairs_per_s=workload.global_batch / times["step"],
        time_s=times,
    )


def plan_all(
    model: ModelShape,
    workload: Workload,
    hw: Hardware,
    gpus: int,
    *,
    impl: str,
    overlap: bool = True,
    save_format: str = "fully_reshardable",
    max_vpp: int = 4,
) -> list[PlanRow]:
    """Every layout priced, fitting ones first by pairs/s, then the rest by memory."""
    rows = [
        plan_layout(
            model, layout, workload, hw, impl=impl, overlap=overlap, save_format=save_format
        )
        for layout in enumerate_layouts(
            model, workload, gpus, hw.gpus_per_node, impl=impl, max_vpp=max_vpp
        )
    ]
    return sorted(rows, key=lambda r: (not r.fits, -r.pairs_per_s if r.fits else r.peak_gib))
