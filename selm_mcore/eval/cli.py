"""``selm eval``: answer benchmarks with a policy, judge offline, write the official files.

    selm eval CONFIG --model HF_DIR --benchmark alpaca_eval [--benchmark mt_bench]
              [--prompts FILE|hf://NAME] [--reference FILE|hf://NAME] --out DIR
              [--model-name NAME] [--set section.key=value ...]

In order: the prompts and reference answers are read (``benchmarks``; --prompts / --reference
replace the config's sources when one benchmark is named); one vLLM engine answers them
(``answers``); the answers are written in the official formats; the configured ranker judges
them against the references (``judge``); the official judges' commands are printed and, with
eval.official_judge=auto, run when their package and API key are present (``official``).

DIR then holds::

    summary.json                              every number below, per benchmark
    eval.md                                   the table `selm eval` prints
    alpaca_eval/model_outputs.json            alpaca_eval's input (instruction, output, ...)
    alpaca_eval/reference_outputs.json        the reference outputs of those instructions
    mt_bench/model_answer/<model>.jsonl       FastChat llm_judge's input
    mt_bench/question.jsonl                   the questions asked
    <benchmark>/judgment.jsonl                the offline judge's comparison per answer turn
    <benchmark>/generation.jsonl              decoding, finish reasons, tokens cut per prompt

The online loop runs this once per round (``online.eval``) on the round's exported policy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selm_mcore.config.eval_section import BENCHMARKS
from selm_mcore.config.io import add_config_arguments, config_from_args
from selm_mcore.config.schema import ConfigError, SelmConfig
from selm_mcore.eval import answers as answer_files
from selm_mcore.eval.benchmarks import BenchmarkItem, read_benchmark, read_references
from selm_mcore.eval.judge import judge_benchmark
from selm_mcore.eval.official import official_jobs, run_official_jobs
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.files import write_json_atomic, write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"


def check_eval_config(cfg: SelmConfig, benchmarks: list[str]) -> None:
    """Refuse what would fail after the answers were generated."""
    for name in benchmarks:
        if name not in BENCHMARKS:
            raise ConfigError(f"benchmark {name!r} is not one of {', '.join(BENCHMARKS)}")
    cfg.eval.check_lengths(benchmarks)
    if "mt_bench" in benchmarks and cfg.ranking.kind == "verifiable":
        raise ConfigError(
            "MT-Bench's questions carry no checkable answer, so ranking.kind=verifiable cannot "
            "judge them; use ranking.kind=pairrm (or reward_model), or leave mt_bench out of "
            "online.eval / --benchmark"
        )


def _write_answers(
    out_dir: Path,
    name: str,
    items: list[BenchmarkItem],
    answers: list[answer_files.Answer],
    model_name: str,
    reference: tuple[str, dict[str, list[str]]],
) -> None:
    turns = [a.turns for a in answers]
    if name == "alpaca_eval":
        answer_files.write_alpaca_eval_outputs(
            out_dir / answer_files.ALPACA_EVAL_OUTPUTS, items, [t[0] for t in turns], model_name
        )
        judged = [item for item in items if item.item_id in reference[1]]
        answer_files.write_alpaca_eval_outputs(
            out_dir / answer_files.ALPACA_EVAL_REFERENCE,
            judged,
            [reference[1][item.item_id][0] for item in judged],
            reference[0],
        )
    else:
        answer_files.write_mt_bench_answers(
            out_dir / answer_files.mt_bench_answer_path(model_name), items, turns, model_name
        )
        write_jsonl_atomic(out_dir / "mt_bench" / "question.jsonl", (i.row for i in items))
    answer_files.write_generation_log(out_dir / name / "generation.jsonl", items, answers)


def run_eval(
    cfg: SelmConfig,
    model_dir: Path,
    benchmarks: list[str],
    out_dir: Path,
    *,
    model_name: str = "",
    prompts: str | None = None,
    reference: str | None = None,
    publish_dir: Path | None = None,
) -> dict[str, Any]:
    """Answer, write, judge (module docstring); returns the summary written to DIR/summary.json.
    ``publish_dir``: where DIR will be moved to (the printed commands name it)."""
    check_eval_config(cfg, benchmarks)
    if (prompts or reference) and len(benchmarks) != 1:
        raise InputError("--prompts / --reference go with exactly one --benchmark")
    if not Path(model_dir).is_dir():
        raise InputError(f"--model {model_dir} is not a folder (an HF model folder)")
    model_name = model_name or cfg.eval.model_name or Path(model_dir).absolute().name
    items = {name: read_benchmark(name, cfg.eval, prompts) for name in benchmarks}
    references = {
        name: read_references(name, cfg.eval, items[name], prompts, reference)
        for name in benchmarks
    }
    generated = answer_files.generate_answers(model_dir, items, cfg)
    for name in benchmarks:
        _write_answers(out_dir, name, items[name], generated[name], model_name, references[name])

    from selm_mcore.rollout.rankers import build_ranker

    ranker = build_ranker(cfg.ranking, trust_remote_code=cfg.model.trust_remote_code)
    summary: dict[str, Any] = {"model": str(model_dir), "model_name": model_name, "benchmarks": {}}
    for name in benchmarks:
        result, rows = judge_benchmark(
            ranker,
            name,
            items[name],
            [a.turns for a in generated[name]],
            references[name][1],
            reference_name=references[name][0],
            answer_key=cfg.ranking.answer_key,
        )
        write_jsonl_atomic(out_dir / name / "judgment.jsonl", rows)
        summary["benchmarks"][name] = result.to_json()
    official = run_official_jobs(
        official_jobs(out_dir, benchmarks, model_name),
        mode=cfg.eval.official_judge,
        out_dir=out_dir,
        publish_dir=publish_dir,
    )
    for name, entry in official.items():
        summary["benchmarks"][name]["official"] = entry
    write_json_atomic(out_dir / SUMMARY, summary)
    return summary


def read_eval_summary(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


# --- CLI: selm eval ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--model", required=True, help="the policy's HF folder to answer with")
    parser.add_argument(
        "--benchmark",
        action="append",
        required=True,
        choices=BENCHMARKS,
        help="a benchmark to answer (repeatable; one engine answers all)",
    )
    parser.add_argument("--prompts", default=None, help="prompt file or hf://OWNER/NAME[...]")
    parser.add_argument("--reference", default=None, help="reference answers, file or hf://...")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument(
        "--publish-dir",
        default=None,
        help="where the output folder will be moved to, for the printed commands (the online "
        "loop writes a partial folder first); default: --out",
    )
    parser.add_argument(
        "--model-name",
        default="",
        help="the name in the answer files (default: eval.model_name, else the folder's name)",
    )


def main(args) -> int:
    from selm_mcore.eval.report import format_eval_table

    cfg = config_from_args(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = run_eval(
        cfg,
        Path(args.model),
        list(dict.fromkeys(args.benchmark)),
        out_dir,
        model_name=args.model_name,
        prompts=args.prompts,
        reference=args.reference,
        publish_dir=Path(args.publish_dir) if args.publish_dir else None,
    )
    table = format_eval_table([(summary["model_name"], summary)])
    write_text_atomic(out_dir / "eval.md", table + "\n")
    print(table)
    return 0
