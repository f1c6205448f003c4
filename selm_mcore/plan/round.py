"""A whole SELM round, phase by phase, estimated: ``selm plan --round``.

    rows = estimate_round(model, cfg, gpus, hw, train_row, RoundAssumptions(...))

Each phase's time is its work divided by a stated rate (``RoundAssumptions``, printed with the
table by ``describe_assumptions``); nothing is measured. Per phase:

    generate  one vLLM engine per generation.tensor_parallel_size GPUs (generation.num_engines
              of them), the round's prompts and the held-out ones spread evenly. Prefill:
              2 N x prompt tokens at ``prefill_mfu``. Decode, memory-bound: each step reads the
              weights and the KV cache of ``gen_batch`` sequences once, at ``hbm_efficiency`` of
              the engine's HBM bandwidth; steps = generated tokens / gen_batch. Plus the engine
              start (``engine_start_s``) and reading the weights (``disk_gbs`` per node).
    rank      PairRM (DeBERTa-v3-large: 24 layers, hidden 1024, FFN 4096) on every GPU
              (ranking.num_workers = GPUs per node on every node): c (c - 1) ordered pairs of
              the c = 3 candidates per prompt (2 for a held-out prompt), each one forward over
              prompt + two candidates (PairRM truncates the prompt to 1224 and a candidate to
              412 tokens plus half the prompt's unused room), padded to the batch's longest by
              ``rank_padding``; 2 x matmul weights x tokens + attention (scores and values,
              and DeBERTa's two relative-position terms over a 512-position span), at
              ``ranker_mfu`` of the peak (fp16). Plus ``ranker_start_s``.
    refpass   one forward of the policy over every pair (the planner's packed micro-batch and
              FLOP count, ``selm_mcore.plan.layouts``) on all GPUs at the planner's MFU, plus
              reading the model.
    train     the planner's step time for the config's layout x steps (pairs / global batch),
              plus writing the step checkpoints (every train.save_interval steps and the last:
              weights + fp32 optimizer state, 14 bytes per parameter in bf16) at ``disk_gbs``
              per node.
    export    read the trained checkpoint and write the HF folder (2 x the weights) at
              ``disk_gbs`` (one node, online.export_tp processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from selm_mcore.modelspec import ModelShape
from selm_mcore.plan.layouts import Hardware, PlanRow, Workload, layer_forward_flops

# DeBERTa-v3-large, PairRM's backbone (microsoft/deberta-v3-large config.json).
RANKER_LAYERS, RANKER_HIDDEN, RANKER_FFN, RANKER_SPAN = 24, 1024, 4096, 512
PAIRRM_SOURCE_MAX, PAIRRM_CANDIDATE_MAX = 1224, 412


@dataclass(frozen=True)
class RoundAssumptions:
    """What the round estimate assumes (every field is a ``selm plan --round`` option)."""

    prompts: int = 20_378  # a third of UltraFeedback-binarized train_prefs (61,135 rows)
    gen_tokens: int = 400  # a generated y_ref's typical length (greedy, up to 1024)
    gen_batch: int = 256  # sequences decoded together per engine (vLLM's max_num_seqs)
    hbm_efficiency: float = 0.5  # of the HBM bandwidth a decode step reaches
    prefill_mfu: float = 0.5
    ranker_mfu: float = 0.3  # DeBERTa in fp16, short sequences, 6 small forwards per batch
    rank_padding: float = 1.15  # batch padded to its longest input / the mean input
    disk_gbs: float = 2.0  # checkpoint read/write bandwidth per node (parallel filesystem)
    engine_start_s: float = 60.0  # vLLM start: CUDA graphs, KV cache allocation
    ranker_start_s: float = 30.0  # import, DeBERTa-v3-large load


@dataclass
class PhaseEstimate:
    phase: str
    work: str
    seconds: float
    note: str


def _gen_phase(model: ModelShape, cfg, hw: Hardware, a: RoundAssumptions, eval_prompts: int):
    gen = cfg.generation
    engines, tp = gen.num_engines, gen.tensor_parallel_size
    prompts = a.prompts + eval_prompts
    per_engine = math.ceil(prompts / engines)
    weight_bytes = 2 * model.num_params()
    kv_per_token = 2 * model.num_layers * model.kv_dim * 2  # K and V, bf16
    context = a.gen_tokens // 2 + cfg.data.max_prompt_length // 2  # mean while decoding
    n_flops = 2 * model.matmul_params()
    prefill = per_engine * (cfg.data.max_prompt_length // 2) * n_flops
    prefill_s = prefill / (tp * hw.peak_tflops * 1e12 * a.prefill_mfu)
    step_bytes = weight_bytes + a.gen_batch * context * kv_per_token
    step_s = step_bytes / (tp * hw.hbm_gbs * 1e9 * a.hbm_efficiency)
    steps = per_engine * gen.n * a.gen_tokens / a.gen_batch
    load_s = weight_bytes / (a.disk_gbs * 1e9)
    seconds = a.engine_start_s + load_s + prefill_s + steps * step_s
    rate = a.gen_batch / step_s
    return PhaseEstimate(
        "generate",
        f"{prompts:,} prompts x {gen.n} x {a.gen_tokens} tokens on {engines} engine(s) of "
        f"{tp} GPU(s)",
        seconds,
        f"~{rate:,.0f} tokens/s per engine decoding {a.gen_batch} sequences; start + load "
        f"{a.engine_start_s + load_s:.0f} s",
    )


def pairrm_forward_flops(
    tokens: float,
    *,
    layers: int = RANKER_LAYERS,
    hidden: int = RANKER_HIDDEN,
    ffn: int = RANKER_FFN,
    span: int = RANKER_SPAN,
) -> float:
    """FLOPs of one DeBERTa forward over a sequence of ``tokens`` (default DeBERTa-v3-large):
    the matmul weights (q, k, v, o and the two FFN matrices) twice per token, the attention
    scores and weighted values, and the content-to-position and position-to-content scores
    over the relative ``span``; the embedding lookup and the relative embeddings' projection
    (once per forward) are not counted."""
    dense = 2 * layers * (4 * hidden * hidden + 2 * hidden * ffn) * tokens
    attention = 4 * layers * hidden * tokens * tokens
    relative = 2 * 2 * layers * hidden * tokens * span
    return float(dense + attention + relative)


def pairrm_input_tokens(prompt: int, candidate: int) -> int:
    """Tokens of one PairRM comparison: prompt + two candidates, as PairRM truncates them."""
    source = min(prompt, PAIRRM_SOURCE_MAX)
    room = PAIRRM_CANDIDATE_MAX + (PAIRRM_SOURCE_MAX - source) // 2
    return source + 2 * min(candidate, room) + 6  # + the prefix and separator tokens


def _rank_phase(cfg, hw: Hardware, gpus: int, a: RoundAssumptions, eval_prompts: int, w):
    if cfg.ranking.kind != "pairrm":
        return PhaseEstimate("rank", f"ranking.kind={cfg.ranking.kind}", 0.0, "not estimated")
    tokens = pairrm_input_tokens(w.prompt_tokens, a.gen_tokens) * a.rank_padding
    forwards = a.prompts * 6 + eval_prompts * 2
    flops = forwards * pairrm_forward_flops(tokens)
    seconds = a.ranker_start_s + flops / (gpus * hw.peak_tflops * 1e12 * a.ranker_mfu)
    one_gpu = flops / (hw.peak_tflops * 1e12 * a.ranker_mfu)
    return PhaseEstimate(
        "rank",
        f"{forwards:,} PairRM forwards of ~{tokens:,.0f} tokens on {gpus} GPU(s)",
        seconds,
        f"{flops / 1e15:,.0f} PFLOP at {a.ranker_mfu:.0%} MFU; on one GPU: {one_gpu / 60:,.1f} min",
    )


def _refpass_phase(model: ModelShape, w: Workload, hw: Hardware, gpus: int, a, nodes: int):
    mb = w.micro_batch()
    dense, attention = layer_forward_flops(model, mb)
    head = 2.0 * model.hidden_size * model.vocab_size * mb.head_positions
    per_pair = (model.num_layers * (dense + attention) + head) / w.pairs_per_micro_batch()
    flops = a.prompts * per_pair
    load_s = 2 * model.num_params() / (a.disk_gbs * 1e9 * nodes)
    seconds = load_s + flops / (gpus * hw.peak_tflops * 1e12 * hw.mfu)
    return PhaseEstimate(
        "refpass",
        f"{a.prompts:,} pairs x {w.pair_tokens()} tokens, one forward",
        seconds,
        f"{flops / 1e15:,.0f} PFLOP at {hw.mfu:.0%} MFU; load {load_s:.0f} s",
    )


def _train_phase(model: ModelShape, cfg, train_row: PlanRow, a: RoundAssumptions, nodes: int):
    steps = math.ceil(a.prompts * cfg.train.epochs / cfg.train.global_batch_size)
    saves = 0
    if cfg.train.save_interval:
        saves = steps // cfg.train.save_interval + (steps % cfg.train.save_interval != 0)
    bytes_per_param = 14 if cfg.model.dtype == "bf16" else 16
    save_s = saves * model.num_params() * bytes_per_param / (a.disk_gbs * 1e9 * nodes)
    load_s = 2 * model.num_params() / (a.disk_gbs * 1e9 * nodes)
    seconds = load_s + steps * train_row.step_s + save_s
    return PhaseEstimate(
        "train",
        f"{steps} steps of {cfg.train.global_batch_size} pairs, {train_row.layout.label()}",
        seconds,
        f"{train_row.step_s:.2f} s per step (the planner); {saves} step checkpoint(s) "
        f"{save_s:.0f} s; load {load_s:.0f} s",
    )


def _export_phase(model: ModelShape, cfg, a: RoundAssumptions):
    bytes_moved = 2 * 2 * model.num_params()  # read the bf16 checkpoint, write safetensors
    return PhaseEstimate(
        "export",
        f"{bytes_moved / 2 / 1e9:,.0f} GB read + written, {cfg.online.export_tp} process(es)",
        bytes_moved / (a.disk_gbs * 1e9),
        "one node's disk bandwidth",
    )


def estimate_round(
    model: ModelShape,
    cfg,
    workload: Workload,
    gpus: int,
    hw: Hardware,
    train_row: PlanRow,
    a: RoundAssumptions,
) -> list[PhaseEstimate]:
    """The five phases of one round (module docstring), in their order."""
    nodes = max(1, gpus // hw.gpus_per_node)
    eval_prompts = cfg.online.max_eval_prompts
    return [
        _gen_phase(model, cfg, hw, a, eval_prompts),
        _rank_phase(cfg, hw, gpus, a, eval_prompts, workload),
        _refpass_phase(model, workload, hw, gpus, a, nodes),
        _train_phase(model, cfg, train_row, a, nodes),
        _export_phase(model, cfg, a),
    ]


def format_round(rows: list[PhaseEstimate]) -> str:
    from selm_mcore.bench.common import format_table

    total = sum(r.seconds for r in rows)
    records = [
        {"phase": r.phase, "work": r.work, "min": r.seconds / 60, "note": r.note} for r in rows
    ]
    records.append({"phase": "round", "work": "", "min": total / 60, "note": "sum, estimated"})
    columns = (
        ("phase", "phase", ""),
        ("min", "min", ".1f"),
        ("work", "work", ""),
        ("note", "assumption / detail", ""),
    )
    return format_table(records, columns)


def describe_assumptions(a: RoundAssumptions, cfg) -> str:
    values = ", ".join(f"--{f.name.replace('_', '-')} {getattr(a, f.name)}" for f in fields(a))
    return (
        f"round estimate (nothing measured): {values}; held-out prompts "
        f"online.max_eval_prompts={cfg.online.max_eval_prompts}; formulas: "
        "selm_mcore/plan/round.py, docs/plan.md"
    )
