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
