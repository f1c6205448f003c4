"""``selm bench plan-check``: train a shape-only random model through the trainer's own step and
set the layout planner's prediction beside what was measured.

    selm bench plan-check --set parallel.tp=2 --nproc 2                  # tiny Llama, CPU, gloo
    selm bench plan-check --hf-dir $(python -m selm_mcore.testing.assets smollm2) --layers 6
    selm bench plan-check --shape llama3-8b --layers 4 --set model.dtype=bf16   # one GPU

The model is built from a config (``--hf-dir`` folder's config.json, or ``--shape``'s numbers,
``--layers`` to cut the depth) with random weights; the pairs are synthetic, all of one size
(``--prompt-tokens``, ``--response-tokens``; y_ref when loss.alpha > 0), so every micro-batch has
the geometry the planner is given. Each step is ``selm_mcore.train.step.train_step`` (packing,
reference log-probs from a zero cache, Megatron DDP + the distributed optimizer, the fused
log-prob path), built by ``build_training``.

Per rank it measures (``selm_mcore.mcore.measure``): the bytes of the parameters, the DDP
gradient buffers and the optimizer state, the peak of the tensors saved for backward over the
first step, and on CUDA the allocator's peak; and the trainer's step time, tokens/s and MFU over
the steps after ``--warmup-steps``. The planner (``selm_mcore.plan``) prices the same layout for
the largest micro-batch of that step. ``--nproc N`` starts N local ranks (gloo on CPU); under
torchrun it uses the ranks it is given.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from selm_mcore.bench.common import BenchError, format_table
from selm_mcore.runtime.outputs import temp_folder

SHAPES = {"llama3-8b": "meta-llama/Meta-Llama-3-8B", "llama3-70b": "meta-llama/Meta-Llama-3-70B"}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--hf-dir",
        default="",
        help="HF folder whose config.json to use (default: the tiny Llama's numbers)",
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="",
        help="a known model's numbers instead of --hf-dir",
    )
    parser.add_argument("--layers", type=int, default=0, help="use this many layers (0 = all)")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--response-tokens", type=int, default=40)
    parser.add_argument("--steps", type=int, default=1, help="measured steps (time, tokens/s)")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="steps before timing; the first one is also measured for memory",
    )
    parser.add_argument(
        "--impl",
        choices=("auto", "te", "local", "cpu"),
        default="auto",
        help="the planner's layer implementation (auto: what this machine runs)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="start this many local ranks (CPU: gloo) unless under torchrun",
    )
    parser.add_argument("--timeout-s", type=float, default=1800, help="limit of --nproc runs")
    parser.add_argument(
        "--summarize",
        nargs="+",
        default=[],
        metavar="JSON",
        help="print a markdown table of earlier results (--json files) and stop",
    )


def _hf_config(args):
    from transformers import LlamaConfig

    from selm_mcore.plan import KNOWN_MODELS
    from selm_mcore.testing.assets import TINY_LLAMA_DEFAULTS

    if args.hf_dir and args.shape:
        raise BenchError("pass --hf-dir or --shape, not both")
    if args.shape:
        numbers = dict(KNOWN_MODELS[SHAPES[args.shape]][0])
        config, name = LlamaConfig(**numbers), args.shape
    elif args.hf_dir:
        from selm_mcore.mcore.model import load_hf_config

        config, name = load_hf_config(args.hf_dir), Path(args.hf_dir).name
    else:
        config, name = LlamaConfig(vocab_size=512, **TINY_LLAMA_DEFAULTS), "tiny Llama"
    if args.layers:
        config.num_hidden_layers = args.layers
        name += f", {args.layers} layers"
    return config, name


def _round_data(cfg, args, vocab_size: int, workdir: Path):
    """Synthetic pairs of one size, a zero reference cache, the pack budget."""
    import torch

    from selm_mcore.bench.logprob_path import random_examples
    from selm_mcore.data.packing import pack_budget
    from selm_mcore.data.tokenize import PreferenceDataset
    from selm_mcore.train.build import RoundData
    from selm_mcore.train.refpass import ReferenceLogps

    steps = args.warmup_steps + args.steps
    count = cfg.train.global_batch_size * steps
    examples = random_examples(
        count,
        args.prompt_tokens,
        args.response_tokens,
        vocab_size,
        seed=0,
        with_yref=cfg.loss.alpha > 0,
    )
    zeros = torch.zeros(count)
    # Random ids need no tokenizer; the trainer only asks one for its padding id.
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    return RoundData(
        source=workdir,
        tokenizer=tokenizer,
        dataset=PreferenceDataset(examples),
        reference_cache=ReferenceLogps(
            zeros, zeros.clone(), zeros.clone() if cfg.loss.alpha > 0 else None
        ),
        total_steps=steps,
        pack_tokens=pack_budget(cfg.data, examples),
    )


def plan_geometry(micro_batch):
    """The planner's view (``selm_mcore.plan.memory.MicroBatch``) of a trainer micro-batch."""
    from selm_mcore.plan.memory import Group, MicroBatch

    batch = micro_batch.batch
    rows, length = batch.tokens.shape
    if not micro_batch.packed:
        return MicroBatch(rows=rows, row_length=length, head_positions=rows * length)
    groups = tuple(
        Group(int(p), tuple(int(r) for r in rs if r)) for _, _, p, *rs in batch.segments.tolist()
    )
    return MicroBatch(
        rows=rows, row_length=length, head_positions=int(batch.head_index.numel()), groups=groups
    )


def _impl(args) -> str:
    import torch

    if args.impl != "auto":
        return args.impl
    if not torch.cuda.is_available():
        return "cpu"
    from selm_mcore.mcore.model import _te_available

    return "te" if _te_available() else "local"


def predict(run, hf_config, geometry, num_microbatches: int, impl: str) -> dict[str, float]:
    """The planner's bytes for this rank (its pipeline stage and DP shard, the DDP buckets it
    was built with) and this step's geometry; activations = the saved tensors at their peak."""
    from selm_mcore.modelspec import ModelShape
    from selm_mcore.plan import memory

    cfg, ctx = run.cfg, run.ctx
    model = ModelShape.from_hf_config(
        hf_config, name="measured", vocab_divisible_by=cfg.model.make_vocab_size_divisible_by
    )
    layout = memory.Layout(
        tp=ctx.tp,
        pp=ctx.pp,
        vpp=ctx.vpp,
        dp=ctx.dp,
        recompute=cfg.model.recompute,
        sequence_parallel=ctx.sequence_parallel,
    )
    rank = memory.rank_memory(
        model,
        layout,
        impl,
        geometry,
        2 if cfg.model.dtype == "bf16" else 4,
        pp_rank=ctx.pp_rank,
        num_microbatches=num_microbatches,
        bucket_size=run.ddp_models[0].bucket_size,
        dp_rank=ctx.dp_rank,
    )
    return {
        "params": rank.params,
        "grads": rank.grads,
        "optimizer": rank.optimizer,
        "activations": rank.saved_peak,
        "working": rank.working,
        "peak": rank.peak,
    }


def _measure_rank(run, impl: str, steps: int, warmup: int) -> dict[str, Any]:
    """Train ``warmup + steps`` steps; memory from the first, time from the rest."""
    import torch

    from selm_mcore.mcore.measure import SavedActivationPeak, static_tensor_bytes
    from selm_mcore.train.step import step_micro_batches, train_step

    ctx = run.ctx
    batches = run.sampler.batches()
    indices = next(batches)
    micro = step_micro_batches(run, indices)
    geometry = max((plan_geometry(mb) for mb in micro), key=lambda g: (g.tokens, g.head_positions))
    with SavedActivationPeak(exclude=run.models) as saved:
        records = [train_step(run, indices)]
    measured = {
        **static_tensor_bytes(run.models, run.ddp_models, run.optimizer),
        "activations": saved.peak_bytes,
    }
    for _ in range(warmup + steps - 1):
        records.append(train_step(run, next(batches)))
    if ctx.device.type == "cuda":  # over every step: the first has no optimizer state yet
        measured["peak"] = torch.cuda.max_memory_allocated(ctx.device)
    timed = records[warmup:] or records[-1:]
    return {
        "rank": ctx.rank,
        "tp_rank": ctx.tp_rank,
        "pp_rank": ctx.pp_rank,
        "dp_rank": ctx.dp_rank,
        "measured": measured,
        "predicted": predict(run, run.models[0].hf_config, geometry, len(micro), impl),
        "micro_batches": len(micro),
        "geometry": {
            "rows": geometry.rows,
            "row_length": geometry.row_length,
            "head_positions": geometry.head_positions,
        },
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "pairs_per_s": statistics.median(r["pairs_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
    }


def _gathered(value: Any, ctx) -> list[Any]:
    import torch.distributed as dist

    if ctx.world_size == 1:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def _relaunch(args) -> dict[str, Any]:
    """``--nproc N`` outside torchrun: the same command as N local ranks; rank 0's output."""
    from selm_mcore.runtime.launch import run_local_ranks

    argv = sys.argv[1:]
    if "--nproc" in argv:
        i = argv.index("--nproc")
        del argv[i : i + 2]
    argv = [a for a in argv if not a.startswith("--nproc=")]
    outs = run_local_ranks(
        ["-P", "-m", "selm_mcore.cli", *argv], args.nproc, timeout_s=args.timeout_s, echo_rank0=True
    )
    print(outs[0], end="")
    args.json = ""  # rank 0 wrote it
    return {"mode": "plan-check", "relaunched": args.nproc}


COLUMNS = (
    ("rank", "rank", ""),
    ("where", "tp/pp/dp", ""),
    ("params", "params MiB", ""),
    ("grads", "grads MiB", ""),
    ("optimizer", "optim MiB", ""),
    ("activations", "activations MiB", ""),
    ("peak", "peak MiB", ""),
)


def _cell(measured: float | None, predicted: float) -> str:
    """``measured / predicted (ratio)`` in MiB."""
    if measured is None:
        return f"- / {predicted / 2**20:.1f}"
    return (
        f"{measured / 2**20:.1f} / {predicted / 2**20:.1f} "
        f"({measured / predicted if predicted else float('nan'):.3f})"
    )


def report(result: dict[str, Any]) -> str:
    rows = []
    for r in result["ranks"]:
        cells = {
            key: _cell(r["measured"].get(key), r["predicted"][key])
            for key in ("params", "grads", "optimizer", "activations", "peak")
        }
        rows.append(
            {"rank": r["rank"], "where": f"{r['tp_rank']}/{r['pp_rank']}/{r['dp_rank']}", **cells}
        )
    first = result["ranks"][0]
    lines = [
        f"plan-check: {result['model']}, {result['dtype']}, tp={result['tp']} pp={result['pp']} "
        f"vpp={result['vpp']} dp={result['dp']}, recompute {result['recompute']}, packing "
        f"{result['packing']}, planner impl {result['impl']}; {first['micro_batches']} "
        f"micro-batch(es) per step of {first['geometry']}",
        "measured / predicted (measured / predicted); activations = peak bytes saved for "
        "backward (torch saved-tensor hooks); peak = CUDA max allocated (GPU only)",
        format_table(rows, COLUMNS),
        f"step {first['step_time_s']:.3f} s, {first['tokens_per_s']:.0f} tokens/s, "
        f"{first['pairs_per_s']:.2f} pairs/s, MFU {first['mfu']:.3f} (the trainer's own "
        "metrics, median over the timed steps)",
    ]
    return "\n".join(lines)


def run_plan_check(args) -> dict[str, Any]:
    """The mode's entry (module docstring); every rank returns the same result."""
    import os

    import torch

    from selm_mcore.config.io import load_config
    from selm_mcore.mcore.checkpoint import DTYPES
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.parallel import destroy_parallel, init_parallel_from
    from selm_mcore.train.build import build_training

    if args.summarize:
        results = [json.loads(Path(path).read_text()) for path in args.summarize]
        print(markdown([r for r in results if r.get("ranks")]))
        return {"mode": "plan-check", "summarized": args.summarize}
    if args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch(args)
    torch.set_num_threads(args.threads)
    hf_config, name = _hf_config(args)
    impl = _impl(args)
    with temp_folder("selm-plan-check-") as workdir:
        cfg = load_config(
            args.config,
            [
                *args.overrides,
                "train.resume=false",
                "train.save_interval=0",
                "train.tensorboard=false",
                f"train.output_dir={workdir}",
            ],
        )
        data = _round_data(cfg, args, hf_config.vocab_size, Path(workdir))
        ctx = init_parallel_from(cfg.parallel)
        try:
            models = build_model(
                hf_config,
                ctx,
                params_dtype=DTYPES[cfg.model.dtype],
                recompute=cfg.model.recompute,
                packed=data.packed,
                make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
            )
            run = build_training(cfg, ctx, data, policy=(models, hf_config))
            start = time.perf_counter()
            ranks = _gathered(_measure_rank(run, impl, args.steps, args.warmup_steps), ctx)
            seconds = time.perf_counter() - start
        finally:
            destroy_parallel()
    result = {
        "mode": "plan-check",
        "model": name,
        "dtype": cfg.model.dtype,
        "tp": ctx.tp,
        "pp": ctx.pp,
        "vpp": ctx.vpp,
        "dp": ctx.dp,
        "recompute": cfg.model.recompute,
        "packing": cfg.data.packing,
        "pack_tokens": data.pack_tokens,
        "impl": impl,
        "device": ctx.device.type,
        "global_batch_size": cfg.train.global_batch_size,
        "seconds": seconds,
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
    }
    if ctx.rank == 0:
        print(report(result))
    else:
        args.json = ""
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    """One markdown row per rank of each result: measured / predicted ratios."""
    lines = [
        "| model | layout | dtype | recompute | packing | rank (tp/pp/dp) | params | grads | "
        "optimizer | activations MiB measured / predicted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        layout = (
            f"tp{result['tp']} pp{result['pp']}"
            + (f" vpp{result['vpp']}" if result["vpp"] else "")
            + f" dp{result['dp']}"
        )
        for r in result["ranks"]:
            ratio = {
                k: r["measured"][k] / r["predicted"][k]
                for k in ("params", "grads", "optimizer", "activations")
            }
            lines.append(
                f"| {result['model']} | {layout} | {result['dtype']} | {result['recompute']} | "
                f"{result['packing']} | {r['tp_rank']}/{r['pp_rank']}/{r['dp_rank']} | "
                f"{ratio['params']:.3f} | {ratio['grads']:.3f} | {ratio['optimizer']:.3f} | "
                f"{r['measured']['activations'] / 2**20:.2f} / "
                f"{r['predicted']['activations'] / 2**20:.2f} ({ratio['activations']:.3f}) |"
            )
    return "\n".join(lines)
