"""Ranker throughput, ``selm bench ranker``: PairRM comparisons per second on one device.

    selm bench ranker [--shape deberta-v3-large|tiny] [--impl auto|both|llm-blender|transformers]
                      [--prompts 64] [--batch-size 32] [--source-tokens 256]
                      [--candidate-tokens 400] [--jitter 0.5] [--repeats 3] [--json OUT]

A PairRM-shaped ranker with random weights (``--shape deberta-v3-large``: PairRM's backbone, 24
layers, hidden 1024, 16 heads, FFN 4096, relative attention over 256 position buckets; ``tiny``
for a CPU smoke run) ranks synthetic prompts with 3 candidates each: every ordered pair of
candidates is one forward over [prompt, candidate i, candidate j], 6 per prompt, as llm-blender's
``Blender.rank`` does for PairRM. fp16 on CUDA (what llm-blender loads PairRM in), fp32 on CPU.

* ``llm-blender`` (when importable): llm-blender's ``CrossCompareReranker`` around the random
  backbone and its ``CrossCompareCollator``, the body of ``Blender.rank`` (collate a batch, move
  it, ``_full_predict``): the ranker selm rank runs.
* ``transformers`` (always): the same forwards without llm-blender, through transformers'
  ``DebertaV2Model``: per ordered pair, the prompt and the two candidates, each as [CLS] prefix
  text [SEP], padded to the batch's longest, and PairRM's head on the three prefix tokens.

Texts are made of words the tiny DeBERTa tokenizer (``selm_mcore.testing.assets``) encodes as one
token each, their lengths drawn within +-``--jitter`` of the given means (seeded), truncated as
PairRM truncates (prompt <= 1224 tokens, a candidate <= 412 plus half the prompt's unused room).
Reported per implementation (median of the repeats, after one untimed pass that also counts the
tokens): pairs/s (ordered comparisons), prompts/s, tokens/s (non-pad), the padded fraction of
the backbone's input, TFLOP/s and MFU (``selm_mcore.plan.round.pairrm_forward_flops`` on the
padded shapes, of the device's bf16/fp16 peak), peak memory, and what a round of
``--round-prompts`` prompts takes on one such device.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from selm_mcore.bench.common import BenchError, format_table
from selm_mcore.plan.round import PAIRRM_CANDIDATE_MAX, PAIRRM_SOURCE_MAX, pairrm_forward_flops

SHAPES: dict[str, dict[str, Any]] = {
    "deberta-v3-large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}
WORDS = "the sea cat dog water story answer number good bad first next final result".split()
CANDIDATES = 3


def deberta_config(shape: str, vocab_size: int):
    """DeBERTa-v3's options (relative attention, 256 position buckets, shared keys) at a size."""
    from selm_mcore.testing.assets import deberta_v3_config

    return deberta_v3_config(
        vocab_size, 0, max_position_embeddings=512, position_biased_input=False, **SHAPES[shape]
    )


def synthetic_items(args) -> list[dict[str, Any]]:
    """``--prompts`` {source, candidates} items of seeded lengths."""
    import numpy as np

    rng = np.random.default_rng(args.seed)

    def text(mean: int) -> str:
        low, high = max(1, int(mean * (1 - args.jitter))), int(mean * (1 + args.jitter)) + 1
        return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high))))

    return [
        {
            "source": text(args.source_tokens),
            "candidates": [text(args.candidate_tokens) for _ in range(CANDIDATES)],
        }
        for _ in range(args.prompts)
    ]


class PairHead(torch.nn.Module):
    """PairRM's head: Linear(2h, h), tanh, Linear(h, 1) on [prompt, candidate] encodings."""

    def __init__(self, hidden: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, source, first, second):
        score = self.layers(torch.cat([source, first], -1)) - self.layers(
            torch.cat([source, second], -1)
        )
        return score.squeeze(-1)


def transformers_ranker(config, tokenizer, device, dtype) -> Callable[[list[dict]], Any]:
    """One batch of items -> the [B, 3, 3] comparisons, through DebertaV2Model alone."""
    from transformers import DebertaV2Model

    with device:  # random weights made where they run (435M of them: seconds on a CPU)
        backbone = DebertaV2Model(config).eval().to(dtype=dtype)
        head = PairHead(config.hidden_size).eval().to(dtype=dtype)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def ids(text: str, limit: int) -> list[int]:
        """A prefix token glued to its text, as llm-blender writes it ("<|source|>" + text)."""
        return tokenizer(text, add_special_tokens=False)["input_ids"][:limit]

    def run(items: list[dict]) -> torch.Tensor:
        sources = [ids("<|source|>" + item["source"], PAIRRM_SOURCE_MAX - 2) for item in items]
        room = PAIRRM_CANDIDATE_MAX + (PAIRRM_SOURCE_MAX - max(map(len, sources))) // 2
        # each candidate as the first (<|candidate1|>) and as the second (<|candidate2|>)
        cands = [
            [[ids(f"<|candidate{k}|>" + c, room) for k in (1, 2)] for c in item["candidates"]]
            for item in items
        ]
        out = torch.zeros(len(items), CANDIDATES, CANDIDATES, device=device)
        for i in range(CANDIDATES):
            for j in range(CANDIDATES):
                if i == j:
                    continue
                # llm-blender's layout: each text encoded as [CLS] prefix text [SEP]
                rows = [
                    [cls, *src, sep, cls, *c[i][0], sep, cls, *c[j][1], sep]
                    for src, c in zip(sources, cands)
                ]
                width = max(map(len, rows))
                input_ids = torch.zeros(len(rows), width, dtype=torch.long)
                mask = torch.zeros(len(rows), width, dtype=torch.long)
                for k, row in enumerate(rows):
                    input_ids[k, : len(row)] = torch.tensor(row)
                    mask[k, : len(row)] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                hidden = backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
                at = torch.arange(len(rows), device=device)
                first = torch.tensor([len(src) + 3 for src in sources])
                second = torch.tensor([len(s) + 5 + len(c[i][0]) for s, c in zip(sources, cands)])
                out[:, i, j] = head(
                    hidden[at, 1], hidden[at, first.to(device)], hidden[at, second.to(device)]
                )
        return out

    run.backbone = backbone  # type: ignore[attr-defined]
    return run


def blender_ranker(config, tokenizer, device, dtype) -> Callable[[list[dict]], Any]:
    """One batch of items -> llm-blender's comparisons (Blender.rank's body for PairRM)."""
    from pathlib import Path

    from transformers import DebertaV2Model

    from selm_mcore.rollout.rankers import pairrm_classes
    from selm_mcore.testing.assets import pairrm_ranker_config

    RankerConfig, CrossCompareCollator, CrossCompareReranker = pairrm_classes()
    ranker_config = RankerConfig.from_dict(
        {**pairrm_ranker_config(Path("unused")), "cache_dir": None}
    )
    collator = CrossCompareCollator(
        ranker_config.source_maxlength, tokenizer, ranker_config.candidate_maxlength
    )
    with device:
        backbone = DebertaV2Model(config)
        backbone.config.out_hidden_state_size = config.hidden_size
        ranker = CrossCompareReranker(backbone, ranker_config, tokenizer).eval().to(dtype=dtype)

    def run(items: list[dict]) -> torch.Tensor:
        batch = collator(items)
        batch = {k: v.to(device) for k, v in batch.items() if v is not None}
        return ranker._full_predict(**batch)["logits"]

    run.backbone = backbone  # type: ignore[attr-defined]
    return run


def count_tokens(run, batches) -> dict[str, float]:
    """One untimed pass that records every backbone input: rows, non-pad and padded tokens,
    and the FLOPs of the padded shapes."""
    seen: list[tuple[int, int, int]] = []

    def record(module, args, kwargs):
        mask = kwargs["attention_mask"]
        seen.append((mask.shape[0], mask.shape[1], int(mask.sum())))

    handle = run.backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                run(batch)
    finally:
        handle.remove()
    cfg = run.backbone.config
    flops = sum(
        rows
        * pairrm_forward_flops(
            width,
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            ffn=cfg.intermediate_size,
            span=2 * cfg.position_buckets,
        )
        for rows, width, _ in seen
    )
    return {
        "pairs": sum(rows for rows, _, _ in seen),
        "tokens": sum(real for _, _, real in seen),
        "padded_tokens": sum(rows * width for rows, width, _ in seen),
        "flops": flops,
    }


def measure(run, batches, device, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def _impls(choice: str) -> list[str]:
    has_blender = importlib.util.find_spec("llm_blender") is not None
    if choice == "llm-blender" and not has_blender:
        raise BenchError("--impl llm-blender: llm-blender is not installed (extra [ranking])")
    if choice == "auto":
        return ["llm-blender" if has_blender else "transformers"]
    if choice == "both":
        return (["llm-blender"] if has_blender else []) + ["transformers"]
    return [choice]


def run_ranker_bench(args) -> dict[str, Any]:
    """``selm bench ranker``: the table of each implementation (module docstring)."""
    from selm_mcore.testing.assets import tiny_deberta_tokenizer
    from selm_mcore.train.metrics import device_peak

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    peak = device_peak(device.type, args.threads, seconds=0.5)
    tokenizer = tiny_deberta_tokenizer()
    vocab = 128_100 if args.shape == "deberta-v3-large" else len(tokenizer)
    items = synthetic_items(args)
    batches = [items[k : k + args.batch_size] for k in range(0, len(items), args.batch_size)]
    rows = []
    for impl in _impls(args.impl):
        torch.manual_seed(args.seed)
        make = blender_ranker if impl == "llm-blender" else transformers_ranker
        run = make(deberta_config(args.shape, vocab), tokenizer, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        counts = count_tokens(run, batches)
        seconds = statistics.median(measure(run, batches, device, args.repeats))
        prompts_per_s = len(items) / seconds
        rows.append(
            {
                "impl": impl,
                "prompts": len(items),
                "batch_size": args.batch_size,
                "pairs": counts["pairs"],
                "seconds": seconds,
                "pairs_per_s": counts["pairs"] / seconds,
                "prompts_per_s": prompts_per_s,
                "tokens_per_s": counts["tokens"] / seconds,
                "mean_input_tokens": counts["tokens"] / counts["pairs"],
                "padded_fraction": 1 - counts["tokens"] / counts["padded_tokens"],
                "tflops": counts["flops"] / seconds / 1e12,
                "mfu": counts["flops"] / seconds / peak["flops"],
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
                if device.type == "cuda"
                else float("nan"),
                "round_minutes_one_device": args.round_prompts / prompts_per_s / 60,
            }
        )
        del run
    result = {
        "mode": "ranker",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "shape": args.shape,
        "peak_source": peak["source"],
        "source_tokens": args.source_tokens,
        "candidate_tokens": args.candidate_tokens,
        "jitter": args.jitter,
        "round_prompts": args.round_prompts,
        "rows": rows,
    }
    print(format_ranker(result))
    return result


def format_ranker(result: dict[str, Any]) -> str:
    columns = (
        ("impl", "impl", ""),
        ("batch_size", "batch", ""),
        ("pairs", "pairs", ""),
        ("mean_input_tokens", "tokens/input", ".0f"),
        ("padded_fraction", "padded", ".2f"),
        ("seconds", "s", ".2f"),
        ("pairs_per_s", "pairs/s", ".1f"),
        ("prompts_per_s", "prompts/s", ".1f"),
        ("tokens_per_s", "tokens/s", ".0f"),
        ("tflops", "TFLOP/s", ".1f"),
        ("mfu", "MFU", ".3f"),
        ("peak_memory_gib", "peak GiB", ".2f"),
        ("round_minutes_one_device", "round min/device", ".1f"),
    )
    head = (
        f"PairRM-shaped ranker ({result['shape']}, random weights, {result['dtype']}) on "
        f"{result['device']}: prompt ~{result['source_tokens']} + 3 candidates ~"
        f"{result['candidate_tokens']} tokens (+-{result['jitter']:.0%}), 6 ordered pairs per "
        f"prompt; peak {result['peak_source']}; round = {result['round_prompts']:,} prompts"
    )
    return head + "\n" + format_table(result["rows"], columns)


def add_arguments(parser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="deberta-v3-large")
    parser.add_argument(
        "--impl",
        choices=("auto", "both", "llm-blender", "transformers"),
        default="auto",
        help="auto: llm-blender when installed, else transformers; both: each that imports",
    )
    parser.add_argument("--prompts", type=int, default=64, help="prompts ranked per repeat")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per batch")
    parser.add_argument("--source-tokens", type=int, default=256, help="mean prompt length")
    parser.add_argument("--candidate-tokens", type=int, default=400, help="mean candidate length")
    parser.add_argument("--jitter", type=float, default=0.5, help="lengths within +-this fraction")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--round-prompts",
        type=int,
        default=20_378,
        help="prompts of a round, for the minutes-per-round column (a third of UltraFeedback)",
    )
