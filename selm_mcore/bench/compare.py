"""Side-by-side benchmarks on the same pairs: ``compare-trl``, ``packing`` and ``refmode``.

Every side runs in its own process, one repeat of each side in turn (A, B, C, A, B, C, ...), so a
change of machine load hits every side alike; tables show medians over repeats, and the ratios
against the first side both as a ratio of medians and as the median of per-repeat ratios.

    compare-trl  ours (data.packing of the config, and packing none) vs TRL's DPOTrainer with
                 precompute_ref_log_probs (and, with --trl-modes onthefly, its on-the-fly
                 reference): DPO (alpha = 0) on the same token ids, batch sizes, dtype, threads
    packing      ours with each data.packing (shared_prompt, pack, none) on the same pairs; with
                 loss.alpha > 0 the pairs carry y_ref (SELM)
    refmode      ours with the reference precomputed vs computed on the fly in every step

Per side: pairs/s, response tokens/s, tokens computed per pair (padding and repeated prompts
included), peak memory. TRL runs in its own cached environment (``setup_trl_env.sh``, shipped
beside this module) through ``selm_mcore/bench/trl_runner.py``.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from selm_mcore.bench.common import (
    BenchError,
    format_table,
    load_average,
    load_cfg,
    median_summary,
    paired_ratio,
    ratio,
    run_worker,
    workdir_for,
)
from selm_mcore.bench.pairs import pair_stats, pairs_for
from selm_mcore.bench.train import ours_command

logger = logging.getLogger(__name__)

# Shipped with the package (setup.py's package_data), run by their paths.
TRL_SETUP_SCRIPT = Path(__file__).with_name("setup_trl_env.sh")
TRL_RUNNER = Path(__file__).with_name("trl_runner.py")
SIDE_KEYS = (
    "pairs_per_s",
    "response_tokens_per_s",
    "step_time_s",
    "computed_tokens_per_pair",
    "peak_memory_mb",
    "tokens_per_s",
    "refpass_s",
    "ref_precompute_s",
)
TABLE = [
    ("impl", "implementation", ""),
    ("pairs_per_s", "pairs/s", ".3f"),
    ("response_tokens_per_s", "resp tok/s", ".1f"),
    ("step_time_s", "step s", ".2f"),
    ("computed_tokens_per_pair", "computed/pair", ".0f"),
    ("peak_memory_mb", "peak MiB", ".0f"),
    ("pairs_vs_first", "first/this pairs/s", ".2f"),
    ("paired_vs_first", "paired", ".2f"),
    ("memory_vs_first", "first/this mem", ".2f"),
]

# A side: (name, command builder taking (out_json) -> argv).
Side = tuple[str, Callable[[Path], list[str]]]


def trl_python(explicit: str | None) -> str:
    """The TRL environment's python: ``--trl-python``, else the one setup_trl_env.sh makes."""
    if explicit:
        if not Path(explicit).is_file():
            raise BenchError(f"--trl-python {explicit} does not exist")
        return explicit
    logger.info("setting up the TRL environment (setup_trl_env.sh; first time ~1-3 min)")
    proc = subprocess.run(["bash", str(TRL_SETUP_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(
            f"{TRL_SETUP_SCRIPT} failed with status {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return proc.stdout.strip().splitlines()[-1]


def _trl_result(result: dict[str, Any], stats: dict[str, float]) -> dict[str, Any]:
    """TRL's runner JSON in our keys (it reports steps and tokens, not pairs)."""
    pairs_per_s = result["global_batch_size"] / result["step_time_s"]
    return {
        **result,
        "pairs_per_s": pairs_per_s,
        "response_tokens_per_s": pairs_per_s * stats["response_tokens_per_pair"],
        "computed_tokens_per_pair": result["padded_tokens_per_step"] / result["global_batch_size"],
    }


def _trl_command(args, cfg, python: str, pairs: Path, ref_mode: str, out: Path) -> list[str]:
    """TRL's runner for one repeat, on our pairs and batch settings."""
    return [
        python,
        "-P",
        str(TRL_RUNNER),
        "--model-dir",
        cfg.model.hf_dir,
        "--pairs",
        str(pairs),
        "--micro-batch-size",
        str(cfg.train.micro_batch_size),
        "--global-batch-size",
        str(cfg.train.global_batch_size),
        "--max-length",
        str(cfg.data.max_length),
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
        "--threads",
        str(args.threads),
        "--ref-mode",
        ref_mode,
        "--beta",
        str(cfg.loss.beta),
        "--lr",
        str(cfg.optim.lr),
        "--seed",
        str(cfg.train.seed),
        "--out",
        str(out),
    ]


def run_sides(
    args, workdir: Path, sides: list[Side], convert: dict[str, Callable[[dict], dict]] | None = None
) -> dict[str, Any]:
    """Alternate repeats of every side; rows (medians, ratios to the first side) and raw runs."""
    convert = convert or {}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in sides}
    loads = [load_average()]
    for repeat in range(args.repeats):
        for index, (name, command) in enumerate(sides):
            out = workdir / f"side{index}-{repeat}.json"
            result = run_worker(
                command(out),
                out,
                threads=args.threads,
                timeout_s=args.timeout_s,
                log_path=workdir / f"side{index}-{repeat}.log",
            )
            results[name].append(convert.get(name, dict)(result))
            logger.info(
                "repeat %d/%d %s: %.3f pairs/s",
                repeat + 1,
                args.repeats,
                name,
                results[name][-1]["pairs_per_s"],
            )
        loads.append(load_average())
    rows = [{"impl": name, **median_summary(runs, SIDE_KEYS)} for name, runs in results.items()]
    first, first_runs = rows[0], results[rows[0]["impl"]]
    for row in rows:
        row["pairs_vs_first"] = ratio(first["pairs_per_s"], row["pairs_per_s"])
        row["paired_vs_first"] = paired_ratio(first_runs, results[row["impl"]], "pairs_per_s")
        row["memory_vs_first"] = ratio(first["peak_memory_mb"], row["peak_memory_mb"])
    return {"rows": rows, "raw": results, "load_average": loads}


def _print(title: str, outcome: dict[str, Any]) -> None:
    loads = outcome["load_average"]
    print(f"{title}; load average {loads[0]} -> {loads[-1]}")
    print(format_table(outcome["rows"], TABLE))
    print(
        "first/this = ratio of the medians (first row over this row); paired = median of the "
        "per-repeat ratios"
    )


def _pairs(args, cfg, workdir: Path, with_yref: bool) -> tuple[Path, dict[str, float]]:
    from transformers import AutoTokenizer

    from selm_mcore.data.tokenize import PreferenceDataset

    steps_total = args.warmup_steps + args.steps
    path = pairs_for(
        cfg, args, workdir, num_pairs=steps_total * cfg.train.global_batch_size, with_yref=with_yref
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    dataset = PreferenceDataset.from_file(
        path,
        tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
    )
    return path, pair_stats(dataset.examples)


def _describe(cfg, args, stats: dict[str, float]) -> str:
    return (
        f"{cfg.model.hf_dir}, {cfg.model.dtype}, {args.threads} thread(s), global batch "
        f"{cfg.train.global_batch_size} pairs, {args.profile} lengths (scale "
        f"{args.length_scale}): per pair {stats['prompt_tokens_per_pair']:.0f} prompt + "
        f"{stats['response_tokens_per_pair']:.0f} response tokens, {args.steps} measured + "
        f"{args.warmup_steps} warm-up steps, median of {args.repeats} alternating repeats"
    )


def run_compare_trl(args) -> dict[str, Any]:
    """Ours (TP1, precomputed reference, alpha=0; the config's packing and packing none) vs TRL
    DPOTrainer with precompute_ref_log_probs (and on the fly with --trl-modes onthefly)."""
    cfg = load_cfg(args)
    if cfg.parallel.tp * cfg.parallel.pp != 1:
        raise BenchError(
            "compare-trl runs at TP1/PP1 (TRL has no tensor/pipeline parallelism): "
            "set parallel.tp=1 parallel.pp=1"
        )
    if cfg.model.dtype != "fp32":
        raise BenchError("compare-trl runs both sides in fp32 on CPU: set model.dtype=fp32")
    workdir = workdir_for(args, "compare-trl")
    pairs, stats = _pairs(args, cfg, workdir, with_yref=False)
    python = trl_python(args.trl_python)
    sides: list[Side] = []
    for packing in dict.fromkeys([cfg.data.packing, "none"]):
        # alpha=0: the pairs carry no y_ref, so both sides do the same DPO work.
        overrides = ["loss.alpha=0", f"data.packing={packing}"]
        sides.append(
            (
                f"selm-mcore (packing {packing})",
                partial(
                    ours_command,
                    args,
                    workdir,
                    pairs,
                    ref_mode="precomputed",
                    extra_overrides=overrides,
                ),
            )
        )
    convert = {}
    for mode in args.trl_modes:
        name = {
            "precompute": "trl DPOTrainer (precompute_ref_log_probs)",
            "onthefly": "trl DPOTrainer (on-the-fly ref)",
        }[mode]
        sides.append(
            (
                name,
                partial(_trl_command, args, cfg, python, pairs, mode),
            )
        )
        convert[name] = lambda result: _trl_result(result, stats)
    outcome = run_sides(args, workdir, sides, convert)
    _print(
        f"ours vs TRL DPOTrainer (DPO, TRL micro batch {cfg.train.micro_batch_size}): "
        f"{_describe(cfg, args, stats)}",
        outcome,
    )
    return {
        "mode": "compare-trl",
        "model": cfg.model.hf_dir,
        "pairs": str(pairs),
        "pair_stats": stats,
        "profile": args.profile,
        "length_scale": args.length_scale,
        **outcome,
    }


def _run_ours(
    args, mode: str, variants: dict[str, tuple[str, list[str]]], what: str
) -> dict[str, Any]:
    """Our trainer in each variant {side name: (reference mode, overrides)} on the same pairs
    (with y_ref when loss.alpha > 0)."""
    cfg = load_cfg(args)
    workdir = workdir_for(args, mode)
    with_yref = cfg.loss.alpha > 0
    pairs, stats = _pairs(args, cfg, workdir, with_yref=with_yref)
    sides: list[Side] = [
        (
            name,
            partial(
                ours_command, args, workdir, pairs, ref_mode=ref_mode, extra_overrides=overrides
            ),
        )
        for name, (ref_mode, overrides) in variants.items()
    ]
    outcome = run_sides(args, workdir, sides)
    _print(
        f"{what} ({'SELM with y_ref' if with_yref else 'DPO'}): {_describe(cfg, args, stats)}",
        outcome,
    )
    return {
        "mode": mode,
        "model": cfg.model.hf_dir,
        "pairs": str(pairs),
        "pair_stats": stats,
        "with_yref": with_yref,
        "profile": args.profile,
        "length_scale": args.length_scale,
        **outcome,
    }


def run_packing(args) -> dict[str, Any]:
    """Our trainer with each data.packing on the same pairs (y_ref too when loss.alpha > 0)."""
    return _run_ours(
        args,
        "packing",
        {
            f"selm-mcore (packing {p})": ("precomputed", [f"data.packing={p}"])
            for p in args.packings
        },
        "packing modes",
    )


def run_refmode(args) -> dict[str, Any]:
    """Our trainer with the precomputed reference vs the reference computed inside each step."""
    return _run_ours(
        args,
        "refmode",
        {f"selm-mcore ({m})": (m, []) for m in ("precomputed", "onthefly")},
        "reference log-probs precomputed vs on the fly",
    )
