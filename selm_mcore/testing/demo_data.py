"""The CPU demo's prompt set: small arithmetic questions with checkable answers, written here.

Every row is an UltraFeedback-binarized preference row (see ``selm_mcore.data.rows``) plus an
``answer`` column that a verifiable-answer ranker checks responses against::

    {"prompt_id": "arith-train-0007",
     "prompt": "What is 17 + 25? Reply with the equation and its result.",
     "chosen":   [{"role": "user", ...}, {"role": "assistant", "content": "17 + 25 = 42"}],
     "rejected": [{"role": "user", ...}, {"role": "assistant", "content": "17 + 25 = 43"}],
     "answer": "42"}

The chosen response states the equation with the right result, the rejected one with a
plausible mistake (off by one or ten, or the result of another operation). Small chat models
answer these in that form and then often ramble; the verifiable ranker (the last number of a
response must be the answer; shorter correct answers win) turns that into preferences. The held-out
set (other questions, with ``answer``
and the right answer as ``chosen``) feeds the per-round reports. The sets are deterministic in
``seed``.

    python -m selm_mcore.testing.demo_data OUT_DIR [--train 64] [--eval 32] [--alpaca-eval 16]

writes ``OUT_DIR/train.jsonl``, ``OUT_DIR/eval.jsonl`` and, with --alpaca-eval, a small benchmark
in alpaca_eval's file format, ``OUT_DIR/alpaca_eval.json`` (other questions, the right equation
as the reference output; ``online.eval: [alpaca_eval]`` answers it every round). Files are
written atomically; unchanged files are not rewritten, so a resumed demo sees the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from selm_mcore.runtime.files import write_text_atomic

INSTRUCTION = "Reply with the equation and its result."


@dataclass(frozen=True)
class Problem:
    left: int
    op: str
    right: int

    @property
    def answer(self) -> int:
        return {
            "+": self.left + self.right,
            "-": self.left - self.right,
            "*": self.left * self.right,
        }[self.op]

    @property
    def question(self) -> str:
        return f"What is {self.left} {self.op} {self.right}? {INSTRUCTION}"

    def statement(self, result: int) -> str:
        return f"{self.left} {self.op} {self.right} = {result}"

    def wrong_answer(self, rng: random.Random) -> int:
        """A plausible mistake: off by one, off by ten, or another operation's result."""
        others = [Problem(self.left, op, self.right).answer for op in "+-*" if op != self.op]
        candidates = [self.answer + 1, self.answer - 1, self.answer + 10, *others]
        return rng.choice([c for c in candidates if c != self.answer])


def _problem(rng: random.Random) -> Problem:
    """Mixed difficulty, so a small model gets some right and some wrong."""
    kind = rng.choice(["add1", "add2", "sub", "mul"])
    if kind == "add1":
        return Problem(rng.randint(1, 9), "+", rng.randint(1, 9))
    if kind == "add2":
        return Problem(rng.randint(10, 99), "+", rng.randint(10, 99))
    if kind == "sub":
        left = rng.randint(10, 99)
        return Problem(left, "-", rng.randint(1, left))
    return Problem(rng.randint(2, 12), "*", rng.randint(2, 12))


def make_problems(count: int, seed: int, exclude: Iterable[str] = ()) -> list[Problem]:
    """``count`` distinct problems (none whose question is in ``exclude``), fixed by ``seed``."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen = set(exclude)
    while len(problems) < count:
        problem = _problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def train_rows(count: int, seed: int = 0) -> list[dict]:
    """Preference rows: chosen = the right answer, rejected = a plausible mistake."""
    rng = random.Random(seed + 1)
    rows = []
    for i, problem in enumerate(make_problems(count, seed)):
        user = {"role": "user", "content": problem.question}
        rows.append(
            {
                "prompt_id": f"arith-train-{i:04d}",
                "prompt": problem.question,
                "chosen": [
                    user,
                    {"role": "assistant", "content": problem.statement(problem.answer)},
                ],
                "rejected": [
                    user,
                    {"role": "assistant", "content": problem.statement(problem.wrong_answer(rng))},
                ],
                "answer": str(problem.answer),
            }
        )
    return rows


def eval_rows(count: int, seed: int = 0, train_count: int = 0) -> list[dict]:
    """Held-out rows (no question shared with the first ``train_count`` train rows). ``chosen``
    holds the right answer: the anchor a pairwise ranker (PairRM) compares responses against."""
    exclude = {p.question for p in make_problems(train_count, seed)} if train_count else set()
    rows = []
    for i, problem in enumerate(make_problems(count, seed + 1000, exclude)):
        user = {"role": "user", "content": problem.question}
        rows.append(
            {
                "prompt_id": f"arith-eval-{i:04d}",
                "prompt": problem.question,
                "chosen": [
                    user,
                    {"role": "assistant", "content": problem.statement(problem.answer)},
                ],
                "answer": str(problem.answer),
            }
        )
    return rows


def alpaca_eval_rows(count: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[dict]:
    """A small benchmark in alpaca_eval's file format (instruction, output, generator, dataset)
    on questions not in ``exclude`` (the train and held-out prompts): the reference output is
    the equation with its right result, and the ``answer`` column lets the verifiable ranker
    judge (alpaca_eval ignores extra columns)."""
    return [
        {
            "instruction": problem.question,
            "output": problem.statement(problem.answer),
            "generator": "arithmetic_reference",
            "dataset": "selm_demo_arithmetic",
            "answer": str(problem.answer),
        }
        for problem in make_problems(count, seed + 2000, exclude)
    ]


def _write_text(text: str, path: Path) -> None:
    if path.exists() and path.read_text() == text:
        return  # keep the file (and its hash) as is for a resumed run
    write_text_atomic(path, text)


def _write_jsonl(rows: list[dict], path: Path) -> None:
    _write_text("".join(json.dumps(row) + "\n" for row in rows), path)


def write_demo_data(
    out_dir: str | os.PathLike,
    num_train: int = 64,
    num_eval: int = 32,
    seed: int = 0,
    num_alpaca_eval: int = 0,
) -> tuple[Path, Path]:
    """Write ``train.jsonl``, ``eval.jsonl`` and (``num_alpaca_eval`` > 0) ``alpaca_eval.json``
    into out_dir; return the first two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    train = train_rows(num_train, seed)
    held_out = eval_rows(num_eval, seed, train_count=num_train)
    _write_jsonl(train, train_path)
    _write_jsonl(held_out, eval_path)
    if num_alpaca_eval:
        asked = {row["prompt"] for row in train + held_out}
        rows = alpaca_eval_rows(num_alpaca_eval, seed, asked)
        _write_text(json.dumps(rows, indent=2) + "\n", out_dir / "alpaca_eval.json")
    return train_path, eval_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selm_mcore.testing.demo_data", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=64, help="preference rows (all rounds)")
    parser.add_argument("--eval", type=int, default=32, help="held-out prompts for the reports")
    parser.add_argument(
        "--alpaca-eval",
        type=int,
        default=0,
        help="prompts of a small benchmark in alpaca_eval's format (alpaca_eval.json)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    train_path, eval_path = write_demo_data(
        args.out_dir, args.train, args.eval, args.seed, args.alpaca_eval
    )
    print(
        f"wrote {args.train} preference rows to {train_path} and {args.eval} held-out prompts "
        f"to {eval_path}"
        + (
            f"; {args.alpaca_eval} benchmark prompts to alpaca_eval.json"
            if args.alpaca_eval
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
