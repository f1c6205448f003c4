"""Benchmark answers: generated with vLLM from a policy's HF folder, written in the files the
official judges read.

    answers = generate_answers(model_dir, {"alpaca_eval": items, ...}, cfg)   # {name: [turns]}
    write_alpaca_eval_outputs(out / "alpaca_eval" / "model_outputs.json", items, answers, name)
    write_mt_bench_answers(out / mt_bench_answer_path(name), items, answers, name)

One vLLM engine (``selm_mcore.rollout.generate.VLLMGenerator``, the engine settings of the
``generation`` section, the context of eval.max_model_len) serves every benchmark. Prompts are
rendered with the model's chat template, as every turn of training and generation is. Items are
batched by their decoding (``benchmarks.decoding``); an item's sampling seed is eval.seed plus
its position in the benchmark (MT-Bench's second turns continue after the first turns), so a
rerun gives the same answers. MT-Bench's second turn is asked in the conversation
[user: turn 1, assistant: the model's own first answer, user: turn 2]. Answers are stripped of
surrounding whitespace (FastChat's gen_model_answer strips them too).

Files (formats of alpaca_eval 0.6 and FastChat llm_judge):

* ``alpaca_eval/model_outputs.json``: a JSON list of {instruction, output, generator, dataset};
* ``mt_bench/model_answer/<model>.jsonl``: {question_id, answer_id, model_id, choices:
  [{index: 0, turns: [answer 1, answer 2]}], tstamp} per question;
* ``<benchmark>/generation.jsonl``: per item the decoding used, the finish reasons and the
  prompt tokens cut to fit the context (not read by the judges).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.rows import strip_response
from selm_mcore.eval.benchmarks import BenchmarkItem, Decoding, decoding
from selm_mcore.runtime.files import write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)

ALPACA_EVAL_OUTPUTS = Path("alpaca_eval") / "model_outputs.json"
ALPACA_EVAL_REFERENCE = Path("alpaca_eval") / "reference_outputs.json"


def mt_bench_answer_path(model_name: str) -> Path:
    return Path("mt_bench") / "model_answer" / f"{model_name}.jsonl"


@dataclasses.dataclass
class Answer:
    """The model's answers to one item: one text per user turn, with how each was made."""

    turns: list[str]
    decoding: Decoding
    finish_reasons: list[str | None]
    prompt_tokens_cut: list[int]


def _conversation(item: BenchmarkItem, answered: Sequence[str]) -> list[dict[str, str]]:
    """The conversation that asks turn ``len(answered)``: earlier turns with the model's own
    answers, then the next user turn."""
    messages = []
    for turn, answer in zip(item.turns, answered):
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": item.turns[len(answered)]})
    return messages


def _answer_turn(generator, base, jobs, seed_base: int) -> list:
    """Generate for ``jobs`` [(answer slot, conversation, Decoding)] batched by decoding;
    returns the completions in job order (seeds: seed_base + job index)."""
    results: list[Any] = [None] * len(jobs)
    groups: dict[Decoding, list[int]] = {}
    for index, (_, _, plan) in enumerate(jobs):
        groups.setdefault(plan, []).append(index)
    for plan, indices in groups.items():
        generator.cfg = dataclasses.replace(
            base, temperature=plan.temperature, top_p=plan.top_p, max_tokens=plan.max_tokens
        )
        # Consecutive seeds within a group: generate_outputs seeds prompt i with seed + offset + i.
        for start, stop in _runs(indices):
            outputs = generator.generate_outputs(
                [jobs[i][1] for i in range(start, stop)], seed_offset=seed_base + start
            )
            for i, completions in zip(range(start, stop), outputs):
                results[i] = completions[0]
    return results


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive stretches [start, stop) of sorted indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def generate_answers(
    model_dir: str | os.PathLike,
    benchmarks: Mapping[str, list[BenchmarkItem]],
    cfg: SelmConfig,
) -> dict[str, list[Answer]]:
    """Answers to every item of every benchmark from one vLLM engine (module docstring)."""
    from selm_mcore.rollout.vllm_engine import VLLMGenerator

    longest = max(
        decoding(item, name, cfg.eval).max_tokens
        for name, items in benchmarks.items()
        for item in items
    )
    base = dataclasses.replace(
        cfg.generation,
        n=1,
        seed=cfg.eval.seed,
        max_model_len=cfg.eval.max_model_len,
        max_tokens=longest,
        num_engines=1,
    )
    out: dict[str, list[Answer]] = {}
    start = time.perf_counter()
    with VLLMGenerator(model_dir, base, cfg.model.trust_remote_code) as generator:
        for name, items in benchmarks.items():
            plans = [decoding(item, name, cfg.eval) for item in items]
            answers = [Answer([], plan, [], []) for plan in plans]
            seed_base = 0
            for turn in range(max(len(item.turns) for item in items)):
                jobs = [
                    (k, _conversation(item, answers[k].turns), plans[k])
                    for k, item in enumerate(items)
                    if turn < len(item.turns)
                ]
                completions = _answer_turn(generator, base, jobs, seed_base)
                seed_base += len(items)
                for (k, _, _), completion in zip(jobs, completions):
                    answers[k].turns.append(strip_response(completion.text))
                    answers[k].finish_reasons.append(completion.finish_reason)
                    answers[k].prompt_tokens_cut.append(completion.prompt_tokens_cut)
            out[name] = answers
            logger.info("%s: answered %d prompts", name, len(items))
    logger.info("benchmark answers generated in %.1f s", time.perf_counter() - start)
    return out


def write_alpaca_eval_outputs(
    path: Path, items: Sequence[BenchmarkItem], outputs: Sequence[str], generator: str
) -> None:
    """alpaca_eval's model_outputs.json: a JSON list of instruction, output, generator,
    dataset (the prompt row's dataset, "selm" when it has none)."""
    rows = [
        {
            "instruction": item.turns[0],
            "output": output,
            "generator": generator,
            "dataset": item.row.get("dataset") or "selm",
        }
        for item, output in zip(items, outputs)
    ]
    write_text_atomic(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


def answer_id(model_id: str, question_id: Any, turns: Sequence[str]) -> str:
    """A 22-character id (FastChat uses shortuuid's 22) derived from the answer, so a rerun
    that gives the same answers writes the same file."""
    text = json.dumps([model_id, str(question_id), list(turns)], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:22]


def write_mt_bench_answers(
    path: Path, items: Sequence[BenchmarkItem], answers: Sequence[Sequence[str]], model_id: str
) -> None:
    """FastChat llm_judge's model answer file (one JSON object per question)."""
    now = time.time()
    rows = []
    for item, turns in zip(items, answers):
        question_id = item.row.get("question_id", item.row.get("prompt_id", item.item_id))
        rows.append(
            {
                "question_id": question_id,
                "answer_id": answer_id(model_id, question_id, turns),
                "model_id": model_id,
                "choices": [{"index": 0, "turns": list(turns)}],
                "tstamp": now,
            }
        )
    write_jsonl_atomic(path, rows)


def write_generation_log(path: Path, items: Sequence[BenchmarkItem], answers: Sequence[Answer]):
    write_jsonl_atomic(
        path,
        (
            {
                "item_id": item.item_id,
                "category": item.category,
                **dataclasses.asdict(answer.decoding),
                "finish_reasons": answer.finish_reasons,
                "prompt_tokens_cut": answer.prompt_tokens_cut,
            }
            for item, answer in zip(items, answers)
        ),
    )


def read_answer_turns(out_dir: Path, benchmark: str, model_name: str) -> list[list[str]]:
    """The answers written by ``write_*`` back, in item order (for the judge)."""
    if benchmark == "alpaca_eval":
        rows = json.loads((out_dir / ALPACA_EVAL_OUTPUTS).read_text())
        return [[row["output"]] for row in rows]
    path = out_dir / mt_bench_answer_path(model_name)
    return [json.loads(line)["choices"][0]["turns"] for line in path.read_text().splitlines()]
