"""The offline judge: the configured ranker's win rate of a model's answers against the
benchmark's reference answers, and the answers' mean length. Needs no API.

    result = judge_benchmark(ranker, "alpaca_eval", items, answers, references, answer_key)

For each item with a reference answer (and each of its turns) the ranker scores
[model answer, reference answer] for the item's prompt: a win when the model's score is higher,
half a win on a tie. The prompt a ranker sees is the user's turn; for MT-Bench's second turn it
is the user's first and second turns joined (both candidates answer the same question; their
first answers differ, so neither is shown). PairRM (the paper's ranker) compares the two
answers directly; a reward model scores each alone; the verifiable ranker needs an answer
column in the prompt rows (``ranking.answer_key``).

The win rate is in percent over judged turns. Mean length is in characters, over every answer
(alpaca_eval's ``avg_length`` is the same: the mean character count of the outputs).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from selm_mcore.eval.benchmarks import BenchmarkItem


@dataclass
class JudgeResult:
    """What the offline judge found for one benchmark."""

    benchmark: str
    judge: str  # the ranker's name
    reference: str  # who wrote the reference answers
    prompts: int  # items answered
    judged: int  # turns compared against a reference
    wins: int
    ties: int
    losses: int
    win_rate: float | None  # percent; None when nothing could be judged
    mean_length: float  # characters per answer
    reference_mean_length: float | None

    def to_json(self) -> dict:
        return asdict(self)


def judge_benchmark(
    ranker,
    benchmark: str,
    items: Sequence[BenchmarkItem],
    answers: Sequence[Sequence[str]],
    references: dict[str, list[str]],
    *,
    reference_name: str,
    answer_key: str = "answer",
) -> tuple[JudgeResult, list[dict]]:
    """(the summary, one row per judged turn: item, turn, both scores, the outcome)."""
    prompts, candidates, answer_values, keys = [], [], [], []
    for item, turns in zip(items, answers):
        reference = references.get(item.item_id)
        if reference is None:
            continue
        for turn in range(min(len(turns), len(reference), len(item.turns))):
            prompts.append("\n\n".join(item.turns[: turn + 1]))
            candidates.append([turns[turn], reference[turn]])
            answer_values.append(item.row.get(answer_key))
            keys.append((item.item_id, turn + 1))
    scores = ranker.scores(prompts, candidates, answers=answer_values) if prompts else []
    rows, outcome = [], {"win": 0, "tie": 0, "loss": 0}
    for (item_id, turn), (model_score, reference_score) in zip(keys, scores):
        result = (
            "win"
            if model_score > reference_score
            else "tie"
            if model_score == reference_score
            else "loss"
        )
        outcome[result] += 1
        rows.append(
            {
                "item_id": item_id,
                "turn": turn,
                "score_model": float(model_score),
                "score_reference": float(reference_score),
                "outcome": result,
            }
        )
    judged = len(rows)
    lengths = [len(text) for turns in answers for text in turns]
    reference_lengths = [len(text) for turns in references.values() for text in turns]
    summary = JudgeResult(
        benchmark=benchmark,
        judge=getattr(ranker, "name", type(ranker).__name__),
        reference=reference_name,
        prompts=len(items),
        judged=judged,
        wins=outcome["win"],
        ties=outcome["tie"],
        losses=outcome["loss"],
        win_rate=100.0 * (outcome["win"] + 0.5 * outcome["tie"]) / judged if judged else None,
        mean_length=statistics.fmean(lengths) if lengths else 0.0,
        reference_mean_length=statistics.fmean(reference_lengths) if reference_lengths else None,
    )
    return summary, rows
