"""Synthetic benchmark pairs and prompts (same token ids for every side of a comparison)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

from selm_mcore.bench.common import BenchError


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
        raise BenchError(f"the tokenizer has only {len(ids)} ' word' tokens; the benchmark's "
                         "synthetic text needs a byte-level BPE tokenizer with English words")
    return ids


def words(tokenizer, pool: list[int], rng: random.Random, num_tokens: int) -> str:
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
    from selm_mcore.data import read_rows
    from selm_mcore.dataset import PreferenceDataset, encode_prompt

    rng = random.Random(seed)
    pool = word_token_ids(tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The chat template adds its own tokens around the user turn: aim the content below it.
    overhead = len(encode_prompt(tokenizer, [{"role": "user", "content": "x"}])) - 1
    records = []
    for i in range(num_pairs):
        prompt = words(tokenizer, pool, rng, prompt_tokens - overhead)
        user = [{"role": "user", "content": prompt}]
        record = {
            "prompt_id": f"bench-{i:05d}",
            "prompt": prompt,
            "chosen": user + [{"role": "assistant",
                               "content": words(tokenizer, pool, rng, chosen_tokens - 1)}],
            "rejected": user + [{"role": "assistant",
                                 "content": words(tokenizer, pool, rng, rejected_tokens - 1)}],
        }
        if yref_tokens > 0:
            record["reference_response"] = words(tokenizer, pool, rng, yref_tokens - 1)
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


def pairs_for(cfg, args, workdir: Path, *, num_pairs: int, with_yref: bool) -> Path:
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
    pool = word_token_ids(tokenizer)
    return [[{"role": "user", "content": words(tokenizer, pool, rng, prompt_tokens)}]
            for _ in range(num_prompts)]
