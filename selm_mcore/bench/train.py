"""``selm bench train`` and ``selm bench refmode``: our trainer's throughput, MFU and memory;
the precomputed reference against the on-the-fly one, side by side."""

from __future__ import annotations

import itertools
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from selm_mcore.bench.common import (
    BenchError,
    config_arg,
    cuda_available,
    format_table,
    load_average,
    load_cfg,
    median_summary,
    paired_ratio,
    ratio,
    run_worker,
    thread_env,
    workdir_for,
)
from selm_mcore.bench.pairs import pairs_for, sequence_lengths
from selm_mcore.metrics import ModelShape, device_peak, training_flops

logger = logging.getLogger(__name__)


def _train_overrides(args, workdir: Path, pairs: Path, *, ref_mode: str, total_steps: int
                     ) -> list[str]:
    """Overrides that turn a config into a benchmark run of ``total_steps`` steps on ``pairs``."""
    return [*args.overrides, f"data.train_path={pairs}", f"train.max_steps={total_steps}",
            f"train.output_dir={workdir / ('train-' + ref_mode)}",
            f"train.reference_mode={ref_mode}",
            f"train.ref_cache={workdir / 'ref_logps.safetensors'}", "train.save_interval=0",
            "train.resume=false", "train.tensorboard=false", "train.log_interval=1000000"]


def _ensure_reference_cache(args, overrides: Sequence[str], workdir: Path) -> float | None:
    """Run ``selm refpass`` (own process, so its memory is not the trainer's) unless the cache
    of these pairs exists; return its wall time, or None when it was reused. The trainer checks
    the cache key, so a stale file is refused rather than used."""
    from selm_mcore.config import load_config, save_config
    from selm_mcore.dataset import load_preferences, load_tokenizer
    from selm_mcore.mcore.checkpoint import hf_files_dir
    from selm_mcore.refpass import (StaleReferenceCacheError, load_reference_cache,
                                    reference_key)

    cfg = load_config(args.config, list(overrides))
    cache = Path(cfg.train.ref_cache)
    if cache.is_file():
        source = cfg.start_model()
        dataset = load_preferences(cfg.data, load_tokenizer(cfg.model, hf_files_dir(source)))
        key = reference_key(dataset, source, max_length=cfg.data.max_length,
                            max_prompt_length=cfg.data.max_prompt_length)
        try:
            load_reference_cache(cache, key)
            return None
        except StaleReferenceCacheError:
            logger.info("reference cache %s belongs to other data: recomputing", cache)
    # `selm refpass` needs a config file: the resolved one (overrides applied).
    resolved = workdir / "refpass_config.yaml"
    save_config(cfg, resolved)
    cmd = [sys.executable, "-P", "-m", "selm_mcore.cli", "refpass", str(resolved)]
    start = time.perf_counter()
    log = workdir / "refpass.log"
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              env=thread_env(args.threads), timeout=args.timeout_s)
    if proc.returncode != 0:
        raise BenchError(f"the reference pass failed (status {proc.returncode}, log {log}):\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    return time.perf_counter() - start


def _step_examples(cfg, num_examples: int, num_steps: int) -> list[list[int]]:
    """Example indices of each optimizer step, as the trainer's sampler draws them (DP=1)."""
    from selm_mcore.batches import DistributedBatchSampler

    sampler = DistributedBatchSampler(num_examples, cfg.train.global_batch_size,
                                      shuffle=cfg.data.shuffle, seed=cfg.train.seed)
    return list(itertools.islice(sampler.batches(), num_steps))


def _repeat_result(records: Sequence[dict], step_examples: Sequence[Sequence[int]], dataset,
                   shape: ModelShape, window: range, *, onthefly: bool, peak: dict | None,
                   steps: int) -> dict[str, Any]:
    """Throughput of one repeat (the steps in ``window``) from the trainer's step records."""
    seconds = sum(records[i]["step_time_s"] for i in window)
    tokens = sum(records[i]["num_tokens"] for i in window)
    flops = [training_flops(shape, sequence_lengths([dataset[j] for j in examples]),
                            reference_forward=onthefly) for examples in step_examples]
    policy_flops = sum(f["policy"] for f in flops)
    return {
        "tokens_per_s": tokens / seconds,
        "step_time_s": statistics.median(records[i]["step_time_s"] for i in window),
        "tokens_per_step": tokens / steps,
        "policy_tflops": policy_flops / seconds / 1e12,
        "total_tflops": sum(f["total"] for f in flops) / seconds / 1e12,
        "mfu": policy_flops / seconds / peak["flops"] if peak else None,
    }


def run_train(args) -> dict[str, Any]:
    """Our trainer in this process (``selm_mcore.trainer.train_round``), measured from the
    per-step records it writes (metrics.jsonl: step_time_s, num_tokens, memory_gib)."""
    import torch

    from selm_mcore.config import load_config
    from selm_mcore.dataset import load_preferences, load_tokenizer
    from selm_mcore.files import read_records
    from selm_mcore.mcore.checkpoint import hf_files_dir
    from selm_mcore.trainer import train_round

    torch.set_num_threads(args.threads)
    base = load_cfg(args)
    workdir = workdir_for(args, "train")
    total_steps = args.warmup_steps + args.repeats * args.steps
    pairs = Path(args.pairs or base.data.train_path or "")
    if not args.pairs and not base.data.train_path:
        pairs = pairs_for(base, args, workdir,
                           num_pairs=total_steps * base.train.global_batch_size,
                           with_yref=base.loss.alpha > 0)
    overrides = _train_overrides(args, workdir, pairs.absolute(), ref_mode=args.ref_mode,
                                 total_steps=total_steps)
    refpass_s = None
    if args.ref_mode == "precomputed":
        refpass_s = _ensure_reference_cache(args, overrides, workdir)
    cfg = load_config(args.config, overrides)
    output_dir = Path(cfg.train.output_dir)
    shutil.rmtree(output_dir, ignore_errors=True)
    start = time.perf_counter()
    train_round(cfg)
    round_s = time.perf_counter() - start

    records = [r for r in read_records(output_dir / "metrics.jsonl") if "step_time_s" in r]
    if len(records) != total_steps:
        raise BenchError(f"{output_dir}/metrics.jsonl has {len(records)} step records, "
                         f"expected {total_steps}")
    dataset = load_preferences(cfg.data, load_tokenizer(cfg.model,
                                                        hf_files_dir(cfg.start_model())))
    shape = ModelShape.from_dir(cfg.model.hf_dir)
    step_examples = _step_examples(cfg, len(dataset), total_steps)
    onthefly = args.ref_mode == "onthefly"
    peak = None if args.no_peak else device_peak("cuda" if cuda_available() else "cpu",
                                                 args.threads)
    repeats = [_repeat_result(records, [step_examples[i] for i in window], dataset, shape,
                              window, onthefly=onthefly, peak=peak, steps=args.steps)
               for window in (range(args.warmup_steps + r * args.steps,
                                    args.warmup_steps + (r + 1) * args.steps)
                              for r in range(args.repeats))]
    row = {"impl": f"selm-mcore ({args.ref_mode} ref)", **median_summary(repeats, (
        "tokens_per_s", "step_time_s", "tokens_per_step", "policy_tflops", "total_tflops", "mfu"))}
    memory_gib = max(r.get("memory_gib", 0.0) for r in records)
    # The trainer's per-step peak (RSS on CPU, allocated on CUDA): the final save is excluded.
    row.update(peak_memory_mb=memory_gib * 1024, refpass_s=refpass_s)
    longest = max(sequence_lengths(dataset.examples))
    row["padded_tokens_per_step"] = statistics.mean(
        len(examples) * (3 if dataset.has_yref else 2) *
        padded_length_of([dataset[j] for j in examples], cfg) for examples in step_examples)
    print(f"selm-mcore training: {cfg.model.hf_dir}, {cfg.model.dtype}, tp={cfg.parallel.tp} "
          f"pp={cfg.parallel.pp}, {args.threads} thread(s), micro batch "
          f"{cfg.train.micro_batch_size} / global {cfg.train.global_batch_size} pairs"
          f"{' + y_ref' if dataset.has_yref else ''}, longest sequence {longest}, reference "
          f"{args.ref_mode}; median of {args.repeats} x {args.steps} steps after "
          f"{args.warmup_steps} warm-up; load average {load_average()}")
    if peak:
        print(f"MFU = policy model FLOP/s (fwd+bwd, causal attention; see selm_mcore/metrics.py) / "
              f"peak; peak: {peak['source']}")
    print(format_table([row], [
        ("impl", "implementation", ""), ("tokens_per_s", "tokens/s", ".1f"),
        ("step_time_s", "step s", ".3f"), ("tokens_per_step", "tok/step", ".0f"),
        ("policy_tflops", "policy TFLOP/s", ".4g"), ("mfu", "MFU", ".3f"),
        ("peak_memory_mb", "peak MiB", ".0f")]))
    return {"mode": "train", "impl": row["impl"], "model": cfg.model.hf_dir,
            "dtype": cfg.model.dtype, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
            "threads": args.threads, "ref_mode": args.ref_mode, "onthefly_how":
            "the trainer's train.reference_mode=onthefly: a frozen reference copy runs a "
            "forward-only pass over each step's micro-batches before the policy step",
            "steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
            "round_s": round_s, "peak": peak, "pairs": str(pairs), **row,
            "step_times_s": [r["step_time_s"] for r in records], "repeat_results": repeats}


def padded_length_of(examples: Sequence, cfg) -> int:
    """T of the trainer's micro-batches for these examples (collate_micro_batches' rule)."""
    from selm_mcore.batches import padded_length

    longest = max(len(e.prompt_ids) + max(map(len, e.responses)) for e in examples)
    return padded_length(longest, cfg.data.pad_to_multiple_of, cfg.data.seq_length())


def ours_command(args, workdir: Path, pairs: Path, out_json: Path, *, ref_mode: str,
                  extra_overrides: Sequence[str] = ()) -> list[str]:
    """``selm bench train`` for one repeat in its own process (same pairs, shared ref cache)."""
    cmd = [sys.executable, "-P", "-m", "selm_mcore.cli", "bench", "train", *config_arg(args),
           "--pairs", str(pairs), "--ref-mode", ref_mode, "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--repeats", "1",
           "--threads", str(args.threads), "--workdir", str(workdir),
           "--timeout-s", str(args.timeout_s), "--json", str(out_json), "--no-peak"]
    for item in [*args.overrides, *extra_overrides]:
        cmd += ["--set", item]
    return cmd


def summarise_side(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    row = {"impl": name, **median_summary(results, (
        "tokens_per_s", "step_time_s", "peak_memory_mb", "tokens_per_step",
        "padded_tokens_per_step", "ref_precompute_s", "refpass_s"))}
    return row


def run_refmode(args) -> dict[str, Any]:
    """Our trainer with the precomputed reference vs the reference computed inside each step."""
    cfg = load_cfg(args)
    workdir = workdir_for(args, "refmode")
    steps_total = args.warmup_steps + args.steps
    with_yref = cfg.loss.alpha > 0
    pairs = pairs_for(cfg, args, workdir, num_pairs=steps_total * cfg.train.global_batch_size,
                       with_yref=with_yref)
    modes = ("precomputed", "onthefly")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    loads = [load_average()]
    for repeat in range(args.repeats):
        for mode in modes:
            out = workdir / f"{mode}-{repeat}.json"
            results[mode].append(run_worker(
                ours_command(args, workdir, pairs, out, ref_mode=mode), out,
                threads=args.threads,
                timeout_s=args.timeout_s, log_path=workdir / f"{mode}-{repeat}.log"))
        loads.append(load_average())
    rows = [summarise_side(f"selm-mcore ({m})", results[m]) for m in modes]
    step_ratio = ratio(rows[0]["step_time_s"], rows[1]["step_time_s"])
    rows[0]["step_time_vs_onthefly"] = step_ratio
    rows[1]["step_time_vs_onthefly"] = 1.0
    rows[0]["paired_step_time_vs_onthefly"] = paired_ratio(
        results["precomputed"], results["onthefly"], "step_time_s")
    rows[1]["paired_step_time_vs_onthefly"] = 1.0
    onthefly_how = results["onthefly"][0].get("onthefly_how", "")
    print(f"reference log-probs precomputed vs on the fly: {cfg.model.hf_dir}, "
          f"{'SELM with y_ref' if with_yref else 'DPO'}, {args.threads} thread(s), median of "
          f"{args.repeats} interleaved repeats; load average {loads[0]} -> {loads[-1]}")
    if onthefly_how:
        print(f"on the fly = {onthefly_how}")
    print(format_table(rows, [
        ("impl", "mode", ""), ("step_time_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ".1f"),
        ("peak_memory_mb", "peak MiB", ".0f"),
        ("step_time_vs_onthefly", "step / on-the-fly", ".2f"),
        ("paired_step_time_vs_onthefly", "paired", ".2f")]))
    return {"mode": "refmode", "model": cfg.model.hf_dir, "threads": args.threads,
            "with_yref": with_yref, "repeats": args.repeats, "load_average": loads,
            "onthefly_how": onthefly_how, "precomputed_vs_onthefly_step_time": step_ratio,
            "precomputed_vs_onthefly_step_time_paired": rows[0]["paired_step_time_vs_onthefly"],
            "rows": rows, "raw": results}
