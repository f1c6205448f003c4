"""selm_mcore.rollout.pairs with table-driven fake rankers and the verifiable ranker: the best/worst
pair rule and its ties, prompt-only rows, refusals, a failing ranker, empty responses, held-out
scores, and ``selm rank`` run in this process (PairRM through the real CLI:
tests/e2e/test_ranking.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from selm_mcore.rollout.pairs import (
    EVAL_ID_PREFIX,
    add_arguments,
    build_pairs,
    drop_empty_responses,
    eval_anchor,
    load_generations,
    main,
    score_eval_responses,
    summarize_stats,
)
from selm_mcore.rollout.rankers import Ranker, RankerError, VerifiableAnswerRanker
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.files import read_records


class TableRanker(Ranker):
    """Scores looked up by candidate text (unknown text scores 0)."""

    name = "table"

    def __init__(self, table):
        self.table = table
        self.calls = []

    def _scores(self, prompts, candidates, answers):
        self.calls.append((prompts, candidates))
        return [[self.table.get(c, 0.0) for c in cands] for cands in candidates]


@pytest.fixture
def pref_row(preference_row):
    """A row as UltraFeedback-binarized has it: ids, a messages column and the scores."""

    def make(prompt_id, y_w, y_l, prompt="Q?"):
        row = preference_row(
            prompt, y_w, y_l, prompt_id=prompt_id, score_chosen=9.0, score_rejected=2.0
        )
        return {**row, "messages": row["chosen"]}

    return make


def test_best_worst_rule_ties_and_yw_becoming_rejected(pref_row):
    rows = [
        pref_row("a", "w_a", "l_a"),  # y_ref best, y_l worst
        pref_row("b", "w_b", "l_b"),  # y_l best, y_w worst: the original y_w is rejected
        pref_row("c", "w_c", "l_c"),  # y_ref ties y_w at the top: y_ref wins the tie
        pref_row("d", "w_d", "l_d"),  # full tie: chosen == rejected == y_ref
        pref_row("e", "w_e", "l_e"),  # y_w and y_l tie at the bottom: y_w (lower index) lost
    ]
    y_refs = {"a": ["r_a"], "b": ["r_b"], "c": "r_c", "d": ["r_d"], "e": ["r_e"]}
    table = {
        "r_a": 3,
        "w_a": 2,
        "l_a": 1,
        "r_b": 2,
        "w_b": 1,
        "l_b": 3,
        "r_c": 5,
        "w_c": 5,
        "l_c": 1,
        "r_d": 1,
        "w_d": 1,
        "l_d": 1,
        "r_e": 4,
        "w_e": 0,
        "l_e": 0,
    }
    ranker = TableRanker(table)
    new_rows, stats = build_pairs(rows, y_refs, ranker)
    assert ranker.calls[0][0] == ["Q?"] * 5  # one group of 3 candidates, raw prompt text
    assert ranker.calls[0][1][1] == ["r_b", "w_b", "l_b"]  # [y_ref, y_w, y_l] in this order
    picked = [(r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in new_rows]
    assert picked == [
        ("r_a", "l_a"),
        ("l_b", "w_b"),
        ("r_c", "l_c"),
        ("r_d", "r_d"),
        ("r_e", "w_e"),
    ]
    assert [s["chosen"] for s in stats] == ["y_ref", "y_l", "y_ref", "y_ref", "y_ref"]
    assert [s["rejected"] for s in stats] == ["y_l", "y_w", "y_l", "y_ref", "y_w"]
    assert [s["tie"] for s in stats] == [False, False, False, True, False]
    assert stats[2]["ranks"] == [1, 1, 3]
    for row, new, ref in zip(rows, new_rows, ["r_a", "r_b", "r_c", "r_d", "r_e"]):
        assert new["reference_response"] == ref
        assert new["prompt"] == "Q?" and new["prompt_id"] == row["prompt_id"]
        assert new["chosen"][:-1] == row["chosen"][:-1] == new["rejected"][:-1]
        assert new["chosen"][-1]["role"] == new["rejected"][-1]["role"] == "assistant"
        assert new["messages"] == new["chosen"]
    assert (new_rows[1]["score_chosen"], new_rows[1]["score_rejected"]) == (3.0, 1.0)
    summary = summarize_stats(stats)
    assert summary["chosen_y_ref"] == 4 and summary["rejected_y_w"] == 2 and summary["ties"] == 1
    assert summary["rows"] == 5 and summary["mean_score_first"] == pytest.approx(3.0)


def test_prompt_only_rows_rank_their_samples_and_mixed_groups(pref_row):
    rows = [
        {
            "prompt_id": "s",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "old"},
            ],
        },
        {"prompt_id": "t", "prompt": "Yo"},
        pref_row("p", "w", "l"),
    ]
    y_refs = {"s": ["s0", "s1", "s2", "s3"], "t": ["t0", "t1", "t2", "t3"], "p": ["r"]}
    table = {
        "s0": 1,
        "s1": 4,
        "s2": 0,
        "s3": 2,
        "t0": 1,
        "t1": 1,
        "t2": 1,
        "t3": 1,
        "r": 0,
        "w": 2,
        "l": 1,
    }
    ranker = TableRanker(table)
    new_rows, stats = build_pairs(rows, y_refs, ranker)
    assert sorted(len(c[0]) for _, c in ranker.calls) == [3, 4]  # grouped by candidate count
    assert new_rows[0]["prompt"] == "Hi"
    assert new_rows[0]["chosen"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "s1"},
    ]
    assert new_rows[0]["rejected"][-1]["content"] == "s2"
    assert new_rows[0]["reference_response"] == "s0"
    assert stats[0]["candidates"] == ["sample_0", "sample_1", "sample_2", "sample_3"]
    assert (new_rows[1]["chosen"][-1]["content"], new_rows[1]["rejected"][-1]["content"]) == (
        "t0",
        "t0",
    )
    assert (stats[2]["chosen"], stats[2]["rejected"]) == ("y_w", "y_ref")


def test_pairs_keep_the_whole_prompt_conversation(preference_row):
    row = preference_row("Q?", "w", "l", prompt_id="m")
    system = {"role": "system", "content": "Be brief."}
    for key in ("chosen", "rejected"):
        row[key] = [system] + row[key]
    new_rows, _ = build_pairs([row], {"m": ["r"]}, TableRanker({"r": 1, "w": 2, "l": 0}))
    assert new_rows[0]["chosen"] == row["chosen"] and new_rows[0]["rejected"] == row["rejected"]
    assert new_rows[0]["prompt"] == "Q?"


def test_build_pairs_refuses_missing_or_short_generations(pref_row):
    ranker = TableRanker({})
    with pytest.raises(InputError, match="prompt_id='x'"):
        build_pairs([pref_row("x", "w", "l")], {}, ranker)
    with pytest.raises(ValueError, match="needs >= 2 generated responses"):
        build_pairs([{"prompt_id": "y", "prompt": "Q"}], {"y": ["only"]}, ranker)
    with pytest.raises(ValueError, match="'chosen' must be a message list"):
        build_pairs(
            [{"prompt_id": "z", "prompt": "Q", "chosen": [], "rejected": []}], {"z": ["r"]}, ranker
        )
    with pytest.raises(ValueError, match="row 0: missing 'prompt_id'"):
        build_pairs([{"prompt": "Q"}], {}, ranker)


class BrokenRanker(Ranker):
    name = "broken"

    def __init__(self, result=None, exc=None):
        self.result, self.exc = result, exc

    def _scores(self, prompts, candidates, answers):
        if self.exc:
            raise self.exc
        return self.result


@pytest.mark.parametrize(
    "ranker, message",
    [
        (
            BrokenRanker(exc=RuntimeError("CUDA out of memory")),
            "broken ranker failed.*out of memory",
        ),
        (BrokenRanker(result=np.zeros((1, 2))), r"shape \(1, 2\), expected \(1, 3\)"),
        (BrokenRanker(result=np.array([[0.0, np.nan, 1.0]])), "non-finite scores for prompt 0"),
    ],
)
def test_a_failing_ranker_stops_build_pairs(pref_row, ranker, message):
    with pytest.raises(RankerError, match=message):
        build_pairs([pref_row("a", "w", "l")], {"a": ["r"]}, ranker)


def test_pairs_with_an_empty_response_leave_training(preference_row):
    def pair(chosen, rejected, y_ref):
        return preference_row("q", chosen, rejected, reference_response=y_ref)

    pairs = [pair("a", "b", "c"), pair("a", "", "x"), pair("a", "b", "  \n")]
    stats = [{}, {}, {}]
    assert drop_empty_responses(pairs, stats) == [pairs[0]]
    assert [s["dropped_empty"] for s in stats] == [False, True, True]


def test_heldout_scores_with_the_verifiable_ranker():
    rows = [
        {"prompt_id": "a", "prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt_id": "b", "prompt": "What is 3 + 3?", "answer": "6"},
    ]
    generations = {
        EVAL_ID_PREFIX + "a": ["2 + 2 = 4"],
        EVAL_ID_PREFIX + "b": ["It is 7."],
        "a": ["not a held-out response"],
    }
    scored = score_eval_responses(VerifiableAnswerRanker(), rows, generations, "answer")
    assert [r["prompt_id"] for r in scored] == ["a", "b"]
    assert scored[0]["response"] == "2 + 2 = 4" and scored[0]["score"] > 1.0  # correct
    assert scored[1]["score"] == 0.0  # wrong
    with pytest.raises(InputError, match="held-out prompt 'c' has no generated response"):
        score_eval_responses(
            VerifiableAnswerRanker(), [{"prompt_id": "c", "prompt": "Q"}], generations, "answer"
        )


def test_eval_anchor_is_the_chosen_response(preference_row):
    assert eval_anchor(preference_row("Q", "good", "bad")) == "good"
    assert eval_anchor({"prompt": "Q"}) is None


def test_load_generations(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "gen.jsonl", [{"prompt_id": "a", "responses": ["x", "y"]}])
    assert load_generations(path) == {"a": ["x", "y"]}
    write_jsonl(path, [{"prompt_id": "a", "responses": "x"}])
    with pytest.raises(ValueError, match="row 1: expected keys prompt_id and responses"):
        load_generations(path)


def selm_rank(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return main(parser.parse_args(list(argv)))


def test_selm_rank_writes_pairs_stats_and_heldout_scores_with_one_ranker(
    tmp_path, write_jsonl, write_config, preference_row
):
    """`selm rank` (what the online loop's rank phase runs): new pairs, their stats and the
    held-out scores from one ranker, the held-out responses under the eval:: prefix."""
    config = write_config(tmp_path / "cfg.yaml", ranking={"kind": "verifiable"})
    rows = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            preference_row("What is 2 + 3?", "It is 5.", "It is 6.", prompt_id="q1", answer="5"),
            preference_row("What is 1 + 1?", "2", "3", prompt_id="q2", answer="2"),
        ],
    )
    evals = write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt_id": "e1", "prompt": "What is 4 + 4?", "answer": "8"}]
    )
    generations = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"prompt_id": "q1", "responses": ["5"]},
            {"prompt_id": "q2", "responses": ["   "]},  # an EOS-only answer
            {"prompt_id": EVAL_ID_PREFIX + "e1", "responses": ["That makes 8."]},
        ],
    )
    out = tmp_path / "rank" / "pairs.jsonl"
    assert (
        selm_rank(
            str(config),
            "--generations",
            str(generations),
            "--rows",
            str(rows),
            "--out",
            str(out),
            "--eval-rows",
            str(evals),
            "--eval-out",
            str(tmp_path / "rank" / "eval_scores.jsonl"),
        )
        == 0
    )
    pairs = read_records(out)
    # q1: y_ref "5" is the shortest correct answer -> chosen; the wrong y_l -> rejected.
    assert [
        (p["prompt_id"], p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs
    ] == [("q1", "5", "It is 6.")]
    stats = read_records(tmp_path / "rank" / "pairs.stats.jsonl")  # default next to --out
    assert [(s["prompt_id"], s["dropped_empty"]) for s in stats] == [("q1", False), ("q2", True)]
    (scored,) = read_records(tmp_path / "rank" / "eval_scores.jsonl")
    assert scored["prompt_id"] == "e1" and scored["response"] == "That makes 8."
    assert scored["score"] == pytest.approx(1 + 1 / (1 + len("That makes 8.")))


def test_selm_rank_matches_integer_prompt_ids_and_names_a_missing_one(
    tmp_path, write_jsonl, write_config, preference_row, capsys
):
    """Rows (and held-out rows) with integer prompt_ids: `selm generate` writes them as strings,
    `selm rank` compares both in one normalised form. A row without a prompt_id, or with a
    float one, is one line naming the file and row."""
    from selm_mcore import cli

    config = write_config(tmp_path / "cfg.yaml", ranking={"kind": "verifiable"})
    rows = [
        preference_row("What is 2 + 3?", "It is 5.", "It is 6.", prompt_id=17, answer="5"),
        preference_row("What is 1 + 1?", "2", "3", prompt_id=18, answer="2"),
    ]
    rows_path = write_jsonl(tmp_path / "rows.jsonl", rows)
    evals = write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt_id": 3, "prompt": "What is 4 + 4?", "answer": "8"}]
    )
    generations = write_jsonl(
        tmp_path / "gen.jsonl",
        [
            {"prompt_id": "17", "responses": ["5"]},
            {"prompt_id": "18", "responses": ["2"]},
            {"prompt_id": EVAL_ID_PREFIX + "3", "responses": ["8"]},
        ],
    )
    out, scores = tmp_path / "pairs.jsonl", tmp_path / "scores.jsonl"
    argv = ["rank", str(config), "--generations", str(generations), "--rows", str(rows_path)]
    argv += ["--out", str(out), "--eval-rows", str(evals), "--eval-out", str(scores)]
    assert cli.main(argv) == 0
    assert [p["prompt_id"] for p in read_records(out)] == ["17", "18"]
    assert [s["prompt_id"] for s in read_records(scores)] == ["3"]
    for bad, expected in ((None, "missing 'prompt_id'"), (1.5, "prompt_id=1.5 must be a string")):
        rows[1]["prompt_id"] = bad
        write_jsonl(rows_path, rows)
        assert cli.main([*argv, "--overwrite"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"selm rank: error: {rows_path} row 2: "), err
        assert expected in err[0]


def test_selm_rank_refuses_half_given_jobs(tmp_path, write_config):
    config = str(write_config(tmp_path / "cfg.yaml", ranking={"kind": "verifiable"}))
    with pytest.raises(ValueError, match="--rows and --out go together"):
        selm_rank(config, "--generations", "g.jsonl", "--rows", "r.jsonl")
    with pytest.raises(ValueError, match="--eval-rows and --eval-out go together"):
        selm_rank(config, "--generations", "g.jsonl", "--eval-out", "e.jsonl")
    with pytest.raises(ValueError, match="nothing to do"):
        selm_rank(config, "--generations", "g.jsonl")


def test_generated_responses_are_stripped_before_ranking_and_training(pref_row):
    """As the reference code strips vLLM's text: y_ref (and prompt-only samples) without
    surrounding whitespace; the dataset's own y_w / y_l stay as they are."""
    rows = [pref_row("a", " w_a ", "l_a"), {"prompt_id": "t", "prompt": "Yo"}]
    y_refs = {"a": ["\n  r_a \n"], "t": [" t0", "t1\n"]}
    ranker = TableRanker({"r_a": 3, " w_a ": 2, "l_a": 1, "t0": 0, "t1": 5})
    new_rows, _ = build_pairs(rows, y_refs, ranker)
    seen = sorted((tuple(c) for _, cands in ranker.calls for c in cands), key=len)
    assert seen == [("t0", "t1"), ("r_a", " w_a ", "l_a")]
    assert new_rows[0]["chosen"][-1]["content"] == "r_a"
    assert new_rows[0]["reference_response"] == "r_a"
    assert new_rows[0]["rejected"][-1]["content"] == "l_a"
    assert (
        new_rows[1]["chosen"][-1]["content"],
        new_rows[1]["rejected"][-1]["content"],
        new_rows[1]["reference_response"],
    ) == ("t1", "t0", "t0")


def test_heldout_responses_are_stripped_before_scoring():
    ranker = VerifiableAnswerRanker()
    rows = [{"prompt_id": "e1", "prompt": "What is 4 + 4?", "answer": "8"}]
    (scored,) = score_eval_responses(
        ranker, rows, {EVAL_ID_PREFIX + "e1": ["  That makes 8.\n"]}, "answer"
    )
    assert scored["response"] == "That makes 8."
    assert scored["score"] == pytest.approx(1 + 1 / (1 + len("That makes 8.")))


def test_rank_warns_about_repeated_prompt_ids(caplog):
    import logging

    from selm_mcore.rollout.pairs import warn_repeated_prompt_ids

    rows = [
        {"prompt_id": "a"},
        {"prompt_id": "b"},
        {"prompt_id": "a"},
        {"prompt": "no id"},
        {"prompt_id": "b"},
    ]
    with caplog.at_level(logging.WARNING, logger="selm_mcore.rollout.pairs"):
        assert warn_repeated_prompt_ids(rows, "rows.jsonl") == 2
    assert (
        "rows.jsonl: 2 rows repeat an earlier row's prompt_id and so share its generated "
        "response (e.g. row 3 repeats prompt_id 'a' of row 1; row 5 repeats prompt_id 'b' "
        "of row 2)"
    ) in caplog.text
    assert warn_repeated_prompt_ids(rows[:2], "rows.jsonl") == 0
