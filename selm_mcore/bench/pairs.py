"""Synthetic benchmark pairs and prompts (same token ids for every side of a comparison)."""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selm_mcore.bench.common import BenchError
from selm_mcore.runtime.outputs import temp_path_for


def word_token_ids(tokenizer) -> list[int]:
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
        raise BenchError(
            f"the tokenizer has only {len(ids)} ' word' tokens; the benchmark's "
            "synthetic text needs a byte-level BPE tokenizer with English words"
        )
    return ids


def words(tokenizer, pool: list[int], rng: random.Random, num_tokens: int) -> str:
    return "".join(tokenizer.decode([rng.choice(pool)]) for _ in range(max(1, num_tokens))).strip()


PROFILES = ("uniform", "realistic")
# The realistic profile at scale 1, shaped like public preference data (UltraFeedback-like):
# log-normal lengths with long tails, prompt median ~150 tokens (at most 512), responses median
# ~300 (prompt + response at most 1024). --length-scale shrinks every length for small machines.
REALISTIC_PROMPT = dict(median=150, sigma=0.9, low=8, high=512)
REALISTIC_RESPONSE = dict(median=300, sigma=0.7, low=4, total=1024)


def pair_lengths(
    profile: str,
    num_pairs: int,
    *,
    prompt_tokens: int,
    chosen_tokens: int,
    rejected_tokens: int,
    with_yref: bool,
    scale: float = 1.0,
    seed: int = 0,
) -> list[tuple[int, int, int, int]]:
    """Target (prompt, chosen, rejected, y_ref) token lengths of each pair (y_ref 0 without).

    ``uniform``: the given lengths for every pair (y_ref as long as chosen); ``realistic``: drawn
    from ``REALISTIC_PROMPT`` / ``REALISTIC_RESPONSE`` with every length times ``scale``.
    """
    if profile not in PROFILES:
        raise BenchError(f"--profile {profile!r} is not one of {', '.join(PROFILES)}")
    if profile == "uniform":
        yref = chosen_tokens if with_yref else 0
        return [(prompt_tokens, chosen_tokens, rejected_tokens, yref)] * num_pairs
    rng = random.Random(seed)

    def draw(median: float, sigma: float, low: float, high: float) -> int:
        value = median * scale * math.exp(sigma * rng.gauss(0.0, 1.0))
        return int(min(max(value, low * scale, 2), high * scale))

    out = []
    for _ in range(num_pairs):
        prompt = draw(**REALISTIC_PROMPT)
        room = REALISTIC_RESPONSE["total"] - prompt / scale
        responses = [
            draw(
                REALISTIC_RESPONSE["median"],
                REALISTIC_RESPONSE["sigma"],
                REALISTIC_RESPONSE["low"],
                room,
            )
            for _ in range(3)
        ]
        out.append((prompt, responses[0], responses[1], responses[2] if with_yref else 0))
    return out


def write_benchmark_pairs(
    path: str | os.PathLike,
    tokenizer,
    lengths: Sequence[tuple],
    *,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    seed: int = 0,
) -> list:
    """Write one synthetic preference row per (prompt, chosen, rejected, y_ref) target length
    and return their TokenizedExamples.

    Rows follow the training schema (``selm_mcore.data.rows``: prompt, chosen/rejected
    conversations,
    ``reference_response`` when y_ref > 0) and also carry the token ids our data pipeline made
    of them (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), so a peer that reads the ids
    trains on exactly our sequences. Lengths are targets: random word tokens re-encode to about
    the asked count (the tables report the real counts); our truncation rules then apply.
    """
    from selm_mcore.data.rows import read_rows
    from selm_mcore.data.tokenize import PreferenceDataset, encode_prompt

    rng = random.Random(seed)
    pool = word_token_ids(tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The chat template adds its own tokens around the user turn: aim the content below it.
    overhead = len(encode_prompt(tokenizer, [{"role": "user", "content": "x"}])) - 1
    records: list[dict[str, Any]] = []
    for i, (prompt_tokens, chosen_tokens, rejected_tokens, yref_tokens) in enumerate(lengths):
        prompt = words(tokenizer, pool, rng, prompt_tokens - overhead)
        user = [{"role": "user", "content": prompt}]
        record: dict[str, Any] = {
            "prompt_id": f"bench-{i:05d}",
            "prompt": prompt,
            "chosen": user
            + [{"role": "assistant", "content": words(tokenizer, pool, rng, chosen_tokens - 1)}],
            "rejected": user
            + [{"role": "assistant", "content": words(tokenizer, pool, rng, rejected_tokens - 1)}],
        }
        if yref_tokens > 0:
            record["reference_response"] = words(tokenizer, pool, rng, yref_tokens - 1)
        records.append(record)
    with temp_path_for(path, ".jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        dataset = PreferenceDataset.from_rows(
            read_rows(tmp, kind="preference").rows,
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        with open(tmp, "w") as f:
            for record, example in zip(records, dataset.examples):
                record.update(
                    prompt_ids=list(example.prompt_ids),
                    chosen_ids=list(example.chosen_ids),
                    rejected_ids=list(example.rejected_ids),
                )
                f.write(json.dumps(record) + "\n")
        tmp.replace(path)
    return dataset.examples


def sequence_lengths(examples: Sequence) -> list[int]:
    """Non-pad lengths of every sequence the policy sees for these examples (all responses)."""
    return [len(e.prompt_ids) + len(r) for e in examples for r in e.responses]


def pairs_for(cfg, args, workdir: Path, *, num_pairs: int, with_yref: bool) -> Path:
    """Write the benchmark pairs once (same file for every side and repeat)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    path = workdir / "pairs.jsonl"
    lengths = pair_lengths(
        args.profile,
        num_pairs,
        prompt_tokens=args.prompt_tokens,
        chosen_tokens=args.chosen_tokens,
        rejected_tokens=args.rejected_tokens,
        with_yref=with_yref,
        scale=args.length_scale,
        seed=cfg.train.seed,
    )
    write_benchmark_pairs(
        path,
        tokenizer,
        lengths,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        seed=cfg.train.seed,
    )
    return path


def pair_stats(examples: Sequence) -> dict[str, float]:
    """Mean tokens per pair of ``examples``: prompt, responses (all of a pair), sequences fed
    unpacked (prompt once per response)."""
    n = max(len(examples), 1)
    return {
        "prompt_tokens_per_pair": sum(len(e.prompt_ids) for e in examples) / n,
        "response_tokens_per_pair": sum(len(r) for e in examples for r in e.responses) / n,
        "sequence_tokens_per_pair": sum(sequence_lengths(examples)) / n,
    }


def benchmark_prompts(
    tokenizer, *, num_prompts: int, prompt_tokens: int, path: str = "", seed: int = 0
) -> list[list[dict[str, str]]]:
    """Prompt conversations: the first ``num_prompts`` rows of ``path`` (any training/prompt file),
    else synthetic user turns of about ``prompt_tokens`` tokens."""
    if path:
        from selm_mcore.data.rows import read_rows

        rows = read_rows(path, kind="prompt").rows[:num_prompts]
        if len(rows) < num_prompts:
            raise BenchError(f"{path} has {len(rows)} prompts < --num-prompts={num_prompts}")
        return [list(r.prompt_messages) for r in rows]
    rng = random.Random(seed)
    pool = word_token_ids(tokenizer)
    return [
        [{"role": "user", "content": words(tokenizer, pool, rng, prompt_tokens)}]
        for _ in range(num_prompts)
    ]
