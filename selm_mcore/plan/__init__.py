"""``selm plan``: which TP/PP/VPP/DP layout and recompute choice fit a GPU, and which is fastest.

    selm plan --model meta-llama/Meta-Llama-3-8B-Instruct --gpus 8
    selm plan --model HF_DIR --gpus 64 --gpus-per-node 8 --gpu-mem 80 --config CONFIG.yaml
    selm plan --check CONFIG.yaml [--set a.b=v ...] [--model HF_DIR] [--gpus N]
    selm plan --round --model NAME --gpus N [--config CONFIG.yaml] [--prompts N ...]

For every valid layout (``selm_mcore.plan.layouts``) and recompute choice (none / selective /
full) it prints the per-GPU memory (``selm_mcore.plan.memory``: parameters, fp32 gradient
buffer, distributed-optimizer state, activations at the config's micro-batch and lengths, the LM
head's logits and log-prob buffers, a transient working estimate, the checkpoint save buffer)
and an estimated step time and pairs/s, fitting layouts first, fastest first; the config's own
layout is marked. ``--check`` prices only the config's layout and exits with status 1 and the
layouts that would fit when it is predicted not to fit (the example scripts run it before
``selm run``). ``--round`` estimates a whole round per phase at the config's layout
(``selm_mcore.plan.round``, its assumptions printed with it). The formulas and how they were
checked against measured runs: docs/plan.md.

``--model`` is an HF folder with config.json of a supported family (llama, mistral, qwen2,
phi3: ``selm_mcore.mcore.families``) or a known name (``KNOWN_MODELS``: Llama-3 8B/70B,
Mistral-7B, Qwen2.5-7B, Phi-3-mini; nothing is downloaded). Batch size, lengths, packing, dtype
and y_ref come from ``--config`` (default: the settings of the example config of a known
model, else of examples/configs/selm_llama3_8b.yaml; ``selm_mcore.plan.known`` holds them).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from selm_mcore.config.io import add_config_arguments, apply_overrides, from_dict, load_config
from selm_mcore.mcore.families import UnsupportedModelError, check_family_config
from selm_mcore.modelspec import ModelShape
from selm_mcore.plan.known import DEFAULT_EXAMPLE, EXAMPLE_SETTINGS, KNOWN_MODELS
from selm_mcore.plan.layouts import (
    Hardware,
    PlanRow,
    Workload,
    plan_all,
    plan_layout,
)
from selm_mcore.plan.memory import IMPLS, SAVE_FORMATS, Layout
from selm_mcore.runtime.errors import UserError

logger = logging.getLogger(__name__)


class PlanError(UserError, ValueError):
    """A model or config the planner cannot price, or a layout predicted not to fit."""


def resolve_model(name_or_dir: str, vocab_divisible_by: int = 128) -> tuple[ModelShape, str]:
    """(the model, the example config file name for a known model, else '')."""
    known = {k.lower(): (k, v) for k, v in KNOWN_MODELS.items()}
    if name_or_dir.lower() in known:
        name, (config, example) = known[name_or_dir.lower()]
        return ModelShape.from_hf_config(
            config, name=name, vocab_divisible_by=vocab_divisible_by
        ), example
    path = Path(name_or_dir) / "config.json"
    if not path.is_file():
        raise PlanError(
            f"--model {name_or_dir}: neither an HF folder with config.json nor a "
            f"known name ({', '.join(KNOWN_MODELS)})"
        )
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    try:
        check_family_config(config)
    except UnsupportedModelError as exc:
        raise PlanError(f"{path}: {exc}") from None
    shape = ModelShape.from_hf_config(
        config, name=str(name_or_dir), vocab_divisible_by=vocab_divisible_by
    )
    return shape, ""


def config_layout(cfg, gpus: int, impl: str) -> Layout:
    """The layout a config runs on ``gpus`` processes."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    mode = cfg.parallel.sequence_parallel  # auto: on with tp > 1 on a GPU
    sequence_parallel = tp > 1 and (mode == "true" or (mode == "auto" and impl != "cpu"))
    if gpus % (tp * pp):
        raise PlanError(f"{gpus} GPUs are not a multiple of parallel.tp * parallel.pp = {tp * pp}")
    return Layout(
        tp=tp,
        pp=pp,
        vpp=cfg.parallel.vpp,
        dp=gpus // (tp * pp),
        recompute=cfg.model.recompute,
        sequence_parallel=sequence_parallel,
    )


# --- output ------------------------------------------------------------------------------------


COLUMNS = (
    ("layout", "layout", ""),
    ("recompute", "recompute", ""),
    ("params", "params", ".1f"),
    ("grads", "grads", ".1f"),
    ("optimizer", "optim", ".1f"),
    ("activations", "activ", ".1f"),
    ("logits", "logits", ".2f"),
    ("working", "work", ".1f"),
    ("save_buffer", "save", ".1f"),
    ("peak", "peak GiB", ".1f"),
    ("fits", "fits", ""),
    ("micro_batches", "mb/step", ".0f"),
    ("step_s", "step s", ".2f"),
    ("pairs_per_s", "pairs/s", ".1f"),
    ("mark", "", ""),
)


def row_record(row: PlanRow) -> dict[str, Any]:
    layout = row.layout
    label = layout.label() + (" sp" if layout.sequence_parallel else "")
    return {
        "layout": label,
        "recompute": layout.recompute,
        **row.memory_gib,
        "fits": "yes" if row.fits else "NO",
        "micro_batches": row.time_s["micro_batches"],
        "step_s": row.step_s,
        "pairs_per_s": row.pairs_per_s,
        "mark": row.mark,
    }


def format_rows(rows: list[PlanRow]) -> str:
    from selm_mcore.bench.common import format_table

    return format_table([row_record(r) for r in rows], COLUMNS)


def describe(
    model: ModelShape, workload: Workload, hw: Hardware, gpus: int, impl: str, config_name: str
) -> str:
    lines = [
        f"model {model.name}: {model.num_params() / 1e9:.2f}B parameters, {model.num_layers} "
        f"layers, hidden {model.hidden_size}, {model.num_heads} heads / {model.num_kv_heads} "
        f"query groups, FFN {model.ffn_hidden_size}, vocabulary {model.vocab_size}"
        f"{' (tied)' if model.tied_embeddings else ''}",
        f"{gpus} GPUs: {hw.describe()}",
        f"layers: {impl} spec{' (sequence parallel with tp > 1)' if impl == 'te' else ''}; "
        f"config {config_name}: global batch {workload.global_batch} pairs, "
        f"{'bf16' if workload.param_bytes == 2 else 'fp32'}, {workload.sequences} sequences "
        "per pair",
        *workload.notes,
        "memory GiB per GPU on the worst pipeline stage; peak = params + grads + optim + "
        "max(activ + logits + work, save); formulas: docs/plan.md",
    ]
    return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        default="",
        help=f"HF folder with config.json, or one of {', '.join(KNOWN_MODELS)} "
        "(default with --check: model.hf_dir of the config)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="GPUs of the run (default with --check: online.nproc_per_node * online.nnodes)",
    )
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument(
        "--config",
        default="",
        help="YAML config for batch sizes, lengths, "
        "packing, dtype (default: the example config of the model's size)",
    )
    parser.add_argument(
        "--check",
        default="",
        metavar="CONFIG",
        help="price only CONFIG's layout; exit 1 if it is predicted not to fit",
    )
    add_config_arguments(parser, config_file="none")
    parser.add_argument(
        "--impl",
        choices=IMPLS,
        default="te",
        help="layer implementation: te (Transformer Engine, sequence parallel), "
        "local (Megatron's local spec on GPU), cpu (local spec on CPU)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="typical prompt length (default: max_prompt_length / 2)",
    )
    parser.add_argument(
        "--response-tokens",
        type=int,
        default=0,
        help="typical response length (default: half the response room)",
    )
    defaults = Hardware()
    parser.add_argument("--mfu", type=float, default=defaults.mfu)
    parser.add_argument("--peak-tflops", type=float, default=defaults.peak_tflops)
    parser.add_argument("--nvlink-gbs", type=float, default=defaults.nvlink_gbs)
    parser.add_argument("--ib-gbs", type=float, default=defaults.ib_gbs)
    parser.add_argument(
        "--headroom", type=float, default=defaults.headroom, help="fraction of --gpu-mem kept free"
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="one DDP bucket (overlap_grad_reduce off) instead of 40M-param ones",
    )
    parser.add_argument(
        "--save-format",
        choices=SAVE_FORMATS,
        default="fully_reshardable",
        help="optimizer format of in-round step checkpoints",
    )
    parser.add_argument("--max-vpp", type=int, default=4)
    parser.add_argument("--top", type=int, default=20, help="fitting layouts shown (0 = all)")
    parser.add_argument("--json", default="", help="also write every row to this JSON file")
    add_round_arguments(parser)


def add_round_arguments(parser) -> None:
    """``--round`` and the assumptions of the round estimate (``selm_mcore.plan.round``)."""
    from dataclasses import fields

    from selm_mcore.plan.round import RoundAssumptions

    parser.add_argument(
        "--round",
        action="store_true",
        help="estimate a whole round per phase (generate, rank, reference pass, train, export) "
        "at the config's layout, with the assumptions below",
    )
    defaults = RoundAssumptions()
    for f in fields(RoundAssumptions):
        default = getattr(defaults, f.name)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"round_{f.name}",
            type=type(default),
            default=default,
            help=f"round estimate: {f.name.replace('_', ' ')} (default {default})",
        )


def run_round(args, model, workload, hw, gpus, cfg, config_name) -> int:
    """Print the per-phase estimate of one round at the config's layout."""
    from dataclasses import fields

    from selm_mcore.plan.round import (
        RoundAssumptions,
        describe_assumptions,
        estimate_round,
        format_round,
    )

    assumptions = RoundAssumptions(
        **{f.name: getattr(args, f"round_{f.name}") for f in fields(RoundAssumptions)}
    )
    row = plan_layout(model, config_layout(cfg, gpus, args.impl), workload, hw, **pricing(args))
    print(describe(model, workload, hw, gpus, args.impl, config_name))
    print(describe_assumptions(assumptions, cfg))
    print(format_round(estimate_round(model, cfg, workload, gpus, hw, row, assumptions)))
    return 0


def build_inputs(args):
    """(model, workload, hardware, gpus, config, config name) from the arguments."""
    path = args.check or args.config
    cfg = load_config(path, args.overrides) if path else None
    model_arg = args.model or (cfg.model.hf_dir if cfg else "")
    if not model_arg:
        raise PlanError("no model: pass --model HF_DIR_OR_NAME (or set model.hf_dir)")
    model, example = resolve_model(
        model_arg, cfg.model.make_vocab_size_divisible_by if cfg else 128
    )
    if cfg is None:
        path = f"examples/configs/{example or DEFAULT_EXAMPLE}"
        raw = copy.deepcopy(EXAMPLE_SETTINGS[example or DEFAULT_EXAMPLE])
        cfg = from_dict(apply_overrides(raw, args.overrides), path)
    gpus = args.gpus or (cfg.online.nproc_per_node * cfg.online.nnodes if args.check else 0)
    if gpus < 1:
        raise PlanError("--gpus N is required (the number of GPUs of the run)")
    try:
        workload = Workload.from_config(
            cfg,
            prompt_tokens=args.prompt_tokens or None,
            response_tokens=args.response_tokens or None,
        )
    except ValueError as exc:
        raise PlanError(f"{path or '<defaults>'}: {exc}") from None
    hw = Hardware(
        gpu_mem_gib=args.gpu_mem,
        gpus_per_node=args.gpus_per_node,
        peak_tflops=args.peak_tflops,
        mfu=args.mfu,
        nvlink_gbs=args.nvlink_gbs,
        ib_gbs=args.ib_gbs,
        headroom=args.headroom,
    )
    return model, workload, hw, gpus, cfg, path or "<defaults>"


def pricing(args) -> dict[str, Any]:
    """How the arguments price a layout: layer implementation, DDP overlap, checkpoint format."""
    return {"impl": args.impl, "overlap": not args.no_overlap, "save_format": args.save_format}


def run_check(args, model, workload, hw, gpus, cfg, config_name) -> int:
    """Price the config's layout; PlanError (exit 1) with the fitting layouts if it does not fit."""
    layout = config_layout(cfg, gpus, args.impl)
    row = plan_layout(model, layout, workload, hw, **pricing(args))
    row.mark = "<- config"
    print(describe(model, workload, hw, gpus, args.impl, config_name))
    print(format_rows([row]))
    if row.fits:
        print(
            f"[plan] {config_name}: {layout.label()} recompute={layout.recompute} is predicted "
            f"to fit: {row.peak_gib:.1f} of {hw.gpu_mem_gib * (1 - hw.headroom):.1f} GiB"
        )
        return 0
    rows = plan_all(model, workload, hw, gpus, max_vpp=args.max_vpp, **pricing(args))
    others = [r for r in rows if r.fits][:5]
    parts = ", ".join(
        f"{k} {row.memory_gib[k]:.1f}"
        for k in ("params", "grads", "optimizer", "activations", "logits", "working")
    )
    fixes = "; ".join(
        f"{r.layout.label()} recompute={r.layout.recompute} "
        f"({r.peak_gib:.1f} GiB, {r.pairs_per_s:.1f} pairs/s)"
        for r in others
    )
    usable = hw.gpu_mem_gib * (1 - hw.headroom)
    raise PlanError(
        f"{config_name}: parallel.tp={layout.tp} pp={layout.pp} vpp={layout.vpp} "
        f"(dp={layout.dp}) with model.recompute={layout.recompute} on {gpus} GPUs is predicted "
        f"to need {row.peak_gib:.1f} GiB per GPU ({parts} GiB), over {usable:.1f} GiB "
        f"({1 - hw.headroom:.0%} of --gpu-mem {hw.gpu_mem_gib:g}). Fix: "
        + (
            f"use a layout that fits, fastest first: {fixes}"
            if fixes
            else "no layout fits: use more GPUs, or lower data.pack_tokens / train.micro_batch_size"
        )
        + " (set parallel.tp / parallel.pp / model.recompute with --set)"
    )


def main(args) -> int:
    model, workload, hw, gpus, cfg, config_name = build_inputs(args)
    if args.round:
        return run_round(args, model, workload, hw, gpus, cfg, config_name)
    if args.check:
        return run_check(args, model, workload, hw, gpus, cfg, config_name)
    rows = plan_all(model, workload, hw, gpus, max_vpp=args.max_vpp, **pricing(args))
    marked = (
        config_layout(cfg, gpus, args.impl)
        if gpus % (cfg.parallel.tp * cfg.parallel.pp) == 0
        else None
    )
    for row in rows:
        if row.layout == marked:
            row.mark = f"<- {Path(config_name).name}"
    fitting = [r for r in rows if r.fits]
    shown = fitting if not args.top else fitting[: args.top]
    shown += [r for r in rows if r.mark and r not in shown]
    print(describe(model, workload, hw, gpus, args.impl, config_name))
    print(
        f"{len(fitting)} of {len(rows)} layouts x recompute choices fit; "
        f"{'all' if len(shown) >= len(fitting) else f'the {len(shown)} fastest'} shown"
    )
    print(format_rows(shown))
    if args.json:
        from selm_mcore.runtime.files import write_json_atomic

        write_json_atomic(
            args.json,
            {
                "model": asdict(model),
                "gpus": gpus,
                "hardware": asdict(hw),
                "impl": args.impl,
                "config": config_name,
                "workload": asdict(workload),
                "rows": [
                    {**row_record(r), "layout": asdict(r.layout), "time_s": r.time_s} for r in rows
                ],
            },
        )
    return 0
