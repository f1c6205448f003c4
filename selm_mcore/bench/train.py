"""``selm bench train``: our trainer's throughput (pairs/s, tokens/s), MFU and peak memory, in
this process; ``ours_command`` runs it as one side of a side-by-side comparison."""

from __future__ import annotations

import logging
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selm_mcore.bench.common import (
    BenchError,
    config_arg,
    format_table,
    load_average,
    load_cfg,
    median_summary,
    thread_env,
    workdir_for,
)
from selm_mcore.bench.pairs import pairs_for
from selm_mcore.runtime.outputs import open_log

logger = logging.getLogger(__name__)


def _train_overrides(
    args, workdir: Path, pairs: Path, *, ref_mode: str, total_steps: int
) -> list[str]:
    """Overrides that turn a config into a benchmark run of ``total_steps`` steps on ``pairs``."""
    return [
        *args.overrides,
        f"data.train_path={pairs}",
        f"train.max_steps={total_steps}",
        f"train.output_dir={workdir / ('train-' + ref_mode)}",
        f"train.reference_mode={ref_mode}",
        f"train.ref_cache={workdir / 'ref_logps.safetensors'}",
        "train.save_interval=0",
        "train.resume=false",
        "train.tensorboard=false",
        "train.log_interval=1000000",
    ]


def _ensure_reference_cache(args, overrides: Sequence[str], workdir: Path) -> float | None:
    """Run ``selm refpass`` (own process, so its memory is not the trainer's) unless the cache
    of these pairs exists; return its wall time, or None when it was reused. The trainer checks
    the cache key, so a stale file is refused rather than used."""
    from selm_mcore.config.io import load_config, save_config
    from selm_mcore.data.tokenize import load_preferences, load_tokenizer
    from selm_mcore.mcore.checkpoint import hf_files_dir
    from selm_mcore.train.refkey import reference_key
    from selm_mcore.train.refpass import StaleReferenceCacheError, load_reference_cache

    cfg = load_config(args.config, list(overrides))
    cache = Path(cfg.train.ref_cache)
    if cache.is_file():
        source = cfg.start_model()
        dataset = load_preferences(cfg.data, load_tokenizer(cfg.model, hf_files_dir(source)))
        key = reference_key(
            dataset,
            source,
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        )
        try:
            load_reference_cache(cache, key)
            return None
        except StaleReferenceCacheError:
            logger.info("reference cache %s belongs to other data: recomputing", cache)
    # `selm refpass` needs a config file: the resolved one (overrides applied).
    resolved = workdir / "refpass_config.yaml"
    save_config(cfg, resolved)
    # --overwrite: a cache there belongs to other data (checked above).
    cmd = [sys.executable, "-P", "-m", "selm_mcore.cli", "refpass", str(resolved), "--overwrite"]
    start = time.perf_counter()
    log = workdir / "refpass.log"
    with open_log(log, append=False) as out:
        proc = subprocess.run(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=thread_env(args.threads),
            timeout=args.timeout_s,
        )
    if proc.returncode != 0:
        raise BenchError(
            f"the reference pass failed (status {proc.returncode}, log {log}):\n"
            f"{log.read_text(errors='replace')[-3000:]}"
        )
    return time.perf_counter() - start


def _repeat_result(records: Sequence[dict], window: range) -> dict[str, Any]:
    """Throughput of one repeat (the steps in ``window``) from the trainer's step records."""
    steps = [records[i] for i in window]
    seconds = sum(r["step_time_s"] for r in steps)

    def total(key: str) -> float:
        return sum(r[key] for r in steps)

    return {
        "pairs_per_s": total("num_examples") / seconds,
        "tokens_per_s": total("num_tokens") / seconds,
        "response_tokens_per_s": total("num_response_tokens") / seconds,
        "step_time_s": statistics.median(r["step_time_s"] for r in steps),
        "tokens_per_step": total("num_tokens") / len(steps),
        "computed_tokens_per_pair": total("num_computed") / total("num_examples"),
        "packing_efficiency": total("num_tokens") / total("num_computed"),
        "tflops": sum(r["tflops"] * r["step_time_s"] for r in steps) / seconds,
        "mfu": sum(r["mfu"] * r["step_time_s"] for r in steps) / seconds,
    }


REPEAT_KEYS = (
    "pairs_per_s",
    "tokens_per_s",
    "response_tokens_per_s",
    "step_time_s",
    "tokens_per_step",
    "computed_tokens_per_pair",
    "packing_efficiency",
    "tflops",
    "mfu",
)


COLUMNS = (
    ("impl", "implementation", ""),
    ("pairs_per_s", "pairs/s", ".3f"),
    ("response_tokens_per_s", "resp tok/s", ".1f"),
    ("step_time_s", "step s", ".3f"),
    ("computed_tokens_per_pair", "computed/pair", ".0f"),
    ("packing_efficiency", "real/computed", ".2f"),
    ("tflops", "TFLOP/s", ".4g"),
    ("mfu", "MFU", ".3f"),
    ("peak_memory_mb", "peak MiB", ".0f"),
)


def _measured_repeats(
    args, output_dir: Path, total_steps: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the trainer's step records, one result per repeat of ``args.steps`` steps after the
    warm-up) from ``output_dir/metrics.jsonl``."""
    from selm_mcore.runtime.files import read_records

    records = [r for r in read_records(output_dir / "metrics.jsonl") if "step_time_s" in r]
    if len(records) != total_steps:
        raise BenchError(
            f"{output_dir}/metrics.jsonl has {len(records)} step records, expected {total_steps}"
        )
    repeats = [
        _repeat_result(
            records,
            range(args.warmup_steps + r * args.steps, args.warmup_steps + (r + 1) * args.steps),
        )
        for r in range(args.repeats)
    ]
    return records, repeats


def run_train(args) -> dict[str, Any]:
    """Our trainer in this process (``selm_mcore.train.trainer.train_round``), measured from the
    per-step records it writes (metrics.jsonl: step time, pairs, tokens fed and computed,
    response tokens, TFLOP/s and MFU of the layout computed, peak memory)."""
    import torch

    from selm_mcore.config.io import load_config
    from selm_mcore.train.trainer import train_round

    torch.set_num_threads(args.threads)
    base = load_cfg(args)
    workdir = workdir_for(args, "train")
    total_steps = args.warmup_steps + args.repeats * args.steps
    pairs = Path(args.pairs or base.data.train_path or "")
    if not args.pairs and not base.data.train_path:
        pairs = pairs_for(
            base,
            args,
            workdir,
            num_pairs=total_steps * base.train.global_batch_size,
            with_yref=base.loss.alpha > 0,
        )
    overrides = _train_overrides(
        args, workdir, pairs.absolute(), ref_mode=args.ref_mode, total_steps=total_steps
    )
    refpass_s = None
    if args.ref_mode == "precomputed":
        refpass_s = _ensure_reference_cache(args, overrides, workdir)
    cfg = load_config(args.config, overrides)
    output_dir = Path(cfg.train.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.perf_counter()
    train_round(cfg)
    round_s = time.perf_counter() - start

    records, repeats = _measured_repeats(args, output_dir, total_steps)
    impl = f"selm-mcore (packing {cfg.data.packing}, {args.ref_mode} ref)"
    row = {"impl": impl, **median_summary(repeats, REPEAT_KEYS)}
    # The trainer's per-step peak (RSS on CPU, allocated on CUDA): the final save is excluded.
    row.update(
        peak_memory_mb=max(r.get("memory_gib", 0.0) for r in records) * 1024, refpass_s=refpass_s
    )
    print(
        f"selm-mcore training: {cfg.model.hf_dir}, {cfg.model.dtype}, tp={cfg.parallel.tp} "
        f"pp={cfg.parallel.pp}, {args.threads} thread(s), global batch "
        f"{cfg.train.global_batch_size} pairs, packing {cfg.data.packing}, reference "
        f"{args.ref_mode}; median of {args.repeats} x {args.steps} steps after "
        f"{args.warmup_steps} warm-up; load average {load_average()}"
    )
    print("MFU = model FLOP/s of the layout computed (selm_mcore/modelspec.py) / device peak")
    print(format_table([row], COLUMNS))
    return {
        "mode": "train",
        "impl": impl,
        "model": cfg.model.hf_dir,
        "dtype": cfg.model.dtype,
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        "packing": cfg.data.packing,
        "threads": args.threads,
        "ref_mode": args.ref_mode,
        "onthefly_how": "the trainer's train.reference_mode=onthefly: a frozen reference "
        "copy runs a forward-only pass over each step's micro-batches before the policy step",
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "round_s": round_s,
        "pairs": str(pairs),
        **row,
        "step_times_s": [r["step_time_s"] for r in records],
        "repeat_results": repeats,
    }


def ours_command(
    args,
    workdir: Path,
    pairs: Path,
    out_json: Path,
    *,
    ref_mode: str,
    extra_overrides: Sequence[str] = (),
) -> list[str]:
    """``selm bench train`` for one repeat in its own process (same pairs, shared ref cache)."""
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "selm_mcore.cli",
        "bench",
        "train",
        *config_arg(args),
        "--pairs",
        str(pairs),
        "--ref-mode",
        ref_mode,
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
        "--repeats",
        "1",
        "--threads",
        str(args.threads),
        "--workdir",
        str(workdir),
        "--timeout-s",
        str(args.timeout_s),
        "--json",
        str(out_json),
    ]
    for item in [*args.overrides, *extra_overrides]:
        cmd += ["--set", item]
    return cmd
