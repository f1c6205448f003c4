"""The CPU demo's prompt set: right answers, wrong rejections, disjoint held-out set, stable."""

from __future__ import annotations

import json
import re

from selm_mcore.data.rows import read_rows
from selm_mcore.rollout.rankers import VerifiableAnswerRanker
from selm_mcore.testing.demo_data import eval_rows, train_rows, write_demo_data


def _true_answer(question: str) -> int:
    left, op, right = re.match(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
    return {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right)}[
        op
    ]


def test_train_rows_are_valid_and_ranked_as_intended(tmp_path):
    rows = train_rows(40, seed=3)
    assert len({r["prompt"] for r in rows}) == 40
    check = VerifiableAnswerRanker.is_correct
    for row in rows:
        assert row["answer"] == str(_true_answer(row["prompt"]))
        assert check(row["chosen"][-1]["content"], row["answer"])
        assert not check(row["rejected"][-1]["content"], row["answer"])
    train_path, eval_path = write_demo_data(tmp_path, num_train=40, num_eval=10, seed=3)
    assert len(read_rows(train_path).rows) == 40  # the project's data schema accepts them


def test_heldout_rows_are_disjoint_and_deterministic(tmp_path):
    train = {r["prompt"] for r in train_rows(64)}
    held_out = eval_rows(32, train_count=64)
    assert not train & {r["prompt"] for r in held_out}
    assert all(r["answer"] == str(_true_answer(r["prompt"])) for r in held_out)
    first = write_demo_data(tmp_path / "a")
    second = write_demo_data(tmp_path / "b")
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    mtime = first[0].stat().st_mtime_ns
    write_demo_data(tmp_path / "a")  # unchanged content: the file is left alone
    assert first[0].stat().st_mtime_ns == mtime
    assert json.loads(first[1].read_text().splitlines()[0])["chosen"][-1]["role"] == "assistant"


def test_the_demo_benchmark_is_in_alpaca_evals_format_on_unseen_questions(tmp_path):
    from official_readers import alpaca_eval_utils

    from selm_mcore.config.eval_section import EvalConfig
    from selm_mcore.eval.benchmarks import read_benchmark, read_references

    write_demo_data(tmp_path, num_train=20, num_eval=8, num_alpaca_eval=6)
    path = tmp_path / "alpaca_eval.json"
    frame = alpaca_eval_utils().load_or_convert_to_dataframe(path)  # alpaca_eval's reader
    assert len(frame) == 6
    asked = {r["prompt"] for r in train_rows(20) + eval_rows(8, train_count=20)}
    assert not asked & set(frame["instruction"])
    for row in frame.to_dict("records"):  # the reference states the right result
        left, op, right = row["instruction"].split("?")[0].split()[2:5]
        value = {"+": int(left) + int(right), "-": int(left) - int(right),
                 "*": int(left) * int(right)}[op]  # fmt: skip
        assert row["output"] == f"{left} {op} {right} = {value}"
        assert str(row["answer"]) == str(value)
    cfg = EvalConfig(alpaca_eval_prompts=str(path))
    items = read_benchmark("alpaca_eval", cfg)
    assert read_references("alpaca_eval", cfg, items)[0] == "arithmetic_reference"
