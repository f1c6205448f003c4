"""``selm bench compare-trl``: our trainer against TRL's DPOTrainer on the same pairs.

TRL runs in its own cached environment (tools/setup_trl_env.sh) through
tools/bench_trl_runner.py; both sides alternate repeats in their own processes.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from selm_mcore.bench.common import (
    REPO_ROOT,
    BenchError,
    format_table,
    load_average,
    load_cfg,
    paired_ratio,
    ratio,
    run_worker,
    workdir_for,
)
from selm_mcore.bench.pairs import pairs_for
from selm_mcore.bench.train import ours_command, summarise_side

logger = logging.getLogger(__name__)

TRL_SETUP_SCRIPT = REPO_ROOT / "tools" / "setup_trl_env.sh"
TRL_RUNNER = REPO_ROOT / "tools" / "bench_trl_runner.py"


def trl_python(explicit: str | None) -> str:
    """The TRL environment's python: ``--trl-python``, else the one tools/setup_trl_env.sh makes."""
    if explicit:
        if not Path(explicit).is_file():
            raise BenchError(f"--trl-python {explicit} does not exist")
        return explicit
    logger.info("setting up the TRL environment (tools/setup_trl_env.sh; first time ~1-3 min)")
    proc = subprocess.run(["bash", str(TRL_SETUP_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{TRL_SETUP_SCRIPT} failed with status {proc.returncode}:\n"
                         f"{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


OURS_CPU_OVERRIDES = ("data.pad_to_multiple_of=8",)


def run_compare_trl(args) -> dict[str, Any]:
    """Ours (TP1, precomputed reference, alpha=0) vs TRL DPOTrainer on-the-fly and precompute."""
    cfg = load_cfg(args)
    if cfg.parallel.tp * cfg.parallel.pp != 1:
        raise BenchError("compare-trl runs at TP1/PP1 (TRL has no tensor/pipeline parallelism): "
                         "set parallel.tp=1 parallel.pp=1")
    if cfg.model.dtype != "fp32":
        raise BenchError("compare-trl runs both sides in fp32 on CPU: set model.dtype=fp32")
    workdir = workdir_for(args, "compare-trl")
    steps_total = args.warmup_steps + args.steps
    pairs = pairs_for(cfg, args, workdir, num_pairs=steps_total * cfg.train.global_batch_size,
                       with_yref=False)
    python = trl_python(args.trl_python)
    sides = {"selm-mcore (precomputed ref)": "ours"}
    if "onthefly" in args.trl_modes:
        sides["trl DPOTrainer (on-the-fly ref)"] = "onthefly"
    if "precompute" in args.trl_modes:
        sides["trl DPOTrainer (precompute_ref_log_probs)"] = "precompute"
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    loads = [load_average()]
    for repeat in range(args.repeats):
        for name, side in sides.items():
            out = workdir / f"{side}-{repeat}.json"
            log = workdir / f"{side}-{repeat}.log"
            if side == "ours":
                # alpha=0: the pairs carry no y_ref, so both sides do the same DPO work.
                cmd = ours_command(args, workdir, pairs, out, ref_mode="precomputed",
                                    extra_overrides=["loss.alpha=0", *OURS_CPU_OVERRIDES])
            else:
                cmd = [python, str(TRL_RUNNER), "--model-dir", cfg.model.hf_dir,
                       "--pairs", str(pairs), "--micro-batch-size", str(cfg.train.micro_batch_size),
                       "--global-batch-size", str(cfg.train.global_batch_size),
                       "--max-length", str(cfg.data.max_length), "--steps", str(args.steps),
                       "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
                       "--ref-mode", side, "--beta", str(cfg.loss.beta),
                       "--lr", str(cfg.optim.lr), "--seed", str(cfg.train.seed), "--out", str(out)]
            results[name].append(run_worker(cmd, out, threads=args.threads,
                                            timeout_s=args.timeout_s, log_path=log))
            logger.info("repeat %d/%d %s: %.1f tokens/s", repeat + 1, args.repeats, name,
                        results[name][-1]["tokens_per_s"])
        loads.append(load_average())
    rows = [summarise_side(name, res) for name, res in results.items()]
    ours, ours_runs = rows[0], results[rows[0]["impl"]]
    for row in rows:
        row["tokens_per_s_vs_this"] = ratio(ours["tokens_per_s"], row["tokens_per_s"])
        row["paired_tokens_per_s_vs_this"] = paired_ratio(ours_runs, results[row["impl"]],
                                                          "tokens_per_s")
        row["memory_vs_this"] = ratio(ours["peak_memory_mb"], row["peak_memory_mb"])
    print(f"ours vs TRL DPOTrainer: {cfg.model.hf_dir}, fp32, {args.threads} thread(s), micro "
          f"batch {cfg.train.micro_batch_size} / global {cfg.train.global_batch_size} pairs, "
          f"{args.steps} measured + {args.warmup_steps} warm-up steps, median of {args.repeats} "
          f"interleaved repeats; load average {loads[0]} -> {loads[-1]}")
    print(format_table(rows, [
        ("impl", "implementation", ""), ("tokens_per_s", "tokens/s", ".1f"),
        ("step_time_s", "step s", ".3f"), ("tokens_per_step", "tok/step", ".0f"),
        ("padded_tokens_per_step", "padded/step", ".0f"), ("peak_memory_mb", "peak RSS MiB", ".0f"),
        ("tokens_per_s_vs_this", "ours/this tok/s", ".2f"),
        ("paired_tokens_per_s_vs_this", "paired", ".2f"),
        ("memory_vs_this", "ours/this mem", ".2f")]))
    print("ours/this = ratio of the medians; paired = median of the per-repeat ratios")
    return {"mode": "compare-trl", "model": cfg.model.hf_dir, "threads": args.threads,
            "micro_batch_size": cfg.train.micro_batch_size,
            "global_batch_size": cfg.train.global_batch_size, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "repeats": args.repeats, "pairs": str(pairs),
            "load_average": loads, "rows": rows, "raw": results}
