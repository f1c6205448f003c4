"""Per-round reports: statistics against numpy, win counts by hand, plots readable as PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selm_mcore.loop.reports import (
    CHOSEN,
    REJECTED,
    YREF,
    RoundSummary,
    ScoreStats,
    TrainStats,
    WinCounts,
    format_round_table,
    plot_score_distributions,
    read_summary,
    write_round_report,
)


def test_score_stats_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50):
        scores = rng.normal(size=n).tolist()
        stats = ScoreStats.of(scores)
        assert stats.n == n
        assert stats.mean == pytest.approx(np.mean(scores), abs=1e-12)
        assert stats.std == pytest.approx(np.std(scores), abs=1e-12)
        assert stats.median == pytest.approx(np.median(scores), abs=1e-12)
        assert stats.p10 == pytest.approx(np.quantile(scores, 0.1), abs=1e-12)
        assert stats.p90 == pytest.approx(np.quantile(scores, 0.9), abs=1e-12)
        assert stats.positive == pytest.approx(np.mean(np.asarray(scores) > 0), abs=1e-12)
    with pytest.raises(ValueError, match="no scores"):
        ScoreStats.of([])


def test_win_counts_by_hand():
    selections = [
        (YREF, REJECTED),  # y_ref best, original y_l worst
        (YREF, CHOSEN),  # y_ref best, original chosen became rejected
        (CHOSEN, YREF),  # y_ref worst
        (CHOSEN, REJECTED),  # original pair kept, y_ref dropped
        (REJECTED, CHOSEN),  # original pair flipped, y_ref dropped
        (YREF, YREF),  # full tie
    ]
    counts = WinCounts.of(selections)
    assert (counts.pairs, counts.yref_chosen, counts.yref_rejected, counts.yref_dropped) == (
        6,
        3,
        1,
        2,
    )
    assert counts.original_kept == 1
    assert counts.original_flipped == 2
    assert counts.full_ties == 1


def test_train_stats_means_and_loss_ends():
    records = [
        {
            "step": s,
            "loss": 0.7 - 0.1 * s,
            "rewards/chosen": 0.01 * s,
            "rewards/rejected": -0.02 * s,
            "rewards/accuracies": s / 4,
            "rewards/margins": 0.03 * s,
        }
        for s in (1, 2, 3)
    ]
    stats = TrainStats.of(records + [{"step": 4, "lr": 1e-7}])  # a record without loss is ignored
    assert stats.steps == 3
    assert stats.rewards_chosen == pytest.approx(0.02)
    assert stats.rewards_rejected == pytest.approx(-0.04)
    assert stats.accuracy == pytest.approx(0.5)
    assert stats.margin == pytest.approx(0.06)
    assert (stats.loss_first, stats.loss_last) == (pytest.approx(0.6), pytest.approx(0.4))
    assert TrainStats.of([]).steps == 0


def _png_shape(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


def test_round_report_files_and_final_table(tmp_path):
    start_scores = [0.0, 1.0, 0.0, 0.0]
    round1 = RoundSummary(
        round=1,
        generator="start",
        eval_scores=ScoreStats.of(start_scores),
        eval_score_values=start_scores,
        wins=WinCounts.of([(YREF, REJECTED), (CHOSEN, YREF)]),
        train=TrainStats.of(
            [
                {
                    "step": 1,
                    "loss": 0.6931,
                    "rewards/chosen": 0.0,
                    "rewards/rejected": 0.0,
                    "rewards/accuracies": 0.0,
                },
                {
                    "step": 2,
                    "loss": 0.61,
                    "rewards/chosen": 0.2,
                    "rewards/rejected": -0.1,
                    "rewards/accuracies": 1.0,
                },
            ]
        ),
        phase_seconds={"generate": 10.0, "train": 20.5},
    )
    records = [
        {"step": 1, "rewards/chosen": 0.0, "rewards/rejected": 0.0},
        {"step": 2, "rewards/chosen": 0.2, "rewards/rejected": -0.1},
    ]
    write_round_report(tmp_path / "r1", round1, [], records)
    for name in ("scores.png", "rewards.png"):
        height, width, _ = _png_shape(tmp_path / "r1" / name)
        assert height > 100 and width > 100
    text = (tmp_path / "r1" / "report.md").read_text()
    assert "y_ref became chosen: 1; rejected: 1; dropped: 0" in text
    assert "loss 0.6931 -> 0.61" in text
    assert read_summary(tmp_path / "r1") == round1  # JSON round trip

    round1_scores = [1.0, 1.0, 0.0, 1.0]
    final = RoundSummary(
        round=0,
        generator="round 1 policy",
        eval_scores=ScoreStats.of(round1_scores),
        eval_score_values=round1_scores,
    )
    write_round_report(tmp_path / "final", final, [round1])
    final_md = (tmp_path / "final" / "report.md").read_text()
    assert "| start | 4 | 0.25 |" in final_md and final_md.count("| 0.250 |") == 1
    assert "| round 1 policy | 4 | 0.75 |" in final_md and "| 0.750 |" in final_md

    table = format_round_table([final, round1]).splitlines()
    assert len(table) == 4  # header, rule, start, round 1
    assert table[2].startswith("| start | 0.250 ± 0.433 (n=4) | 0.250 |")
    # round 1's row shows the scores of the policy round 1 trained (from the final evaluation)
    assert table[3].startswith(
        "| round 1 | 0.750 ± 0.433 (n=4) | 0.750 | 2 | 1/1/0 | 0 | 0.1 | -0.05 | 0.5 |"
    )
    assert "0.6931->0.61" in table[3] and table[3].endswith("| 30 |")


def test_table_without_final_eval_leaves_last_policy_unscored():
    rounds = [
        RoundSummary(round=r, generator=f"g{r}", eval_scores=ScoreStats.of([float(r)]))
        for r in (1, 2)
    ]
    table = format_round_table(rounds).splitlines()
    assert table[2].startswith("| start | 1.000")
    assert table[3].startswith("| round 1 | 2.000")
    assert table[4].startswith("| round 2 | - | - |")


def test_constant_scores_still_plot(tmp_path):
    plot_score_distributions({"a": [1.0, 1.0], "b": [1.0]}, tmp_path / "s.png")
    assert _png_shape(tmp_path / "s.png")[0] > 100
    assert json.dumps(RoundSummary(round=1, generator="x").to_json())


def test_phase_times_table():
    from selm_mcore.loop.reports import format_phase_times

    table = format_phase_times(
        {
            "round1/generate": 10.0,
            "round1/train": 5.0,
            "round2/export": 2.0,
            "round2/generate": 8.0,
            "final/generate": 3.5,
        }
    ).splitlines()
    assert table[0] == "| phase | round1 | round2 | final | total |"
    assert table[2] == "| generate | 10.0 | 8.0 | 3.5 | 21.5 |"
    assert table[3] == "| train | 5.0 | - | - | 5.0 |"
    assert table[4] == "| export | - | 2.0 | - | 2.0 |"
    assert table[5] == "| total | 15.0 | 10.0 | 3.5 | 28.5 |"


def test_table_with_a_dpo_warmup_round(tmp_path):
    """Round 0 (the DPO warm-up) scores the start model; round 1 scores the warm-up policy."""
    warmup = RoundSummary(round=0, generator="start", eval_scores=ScoreStats.of([0.0]), warmup=True)
    round1 = RoundSummary(round=1, generator="round 0 policy", eval_scores=ScoreStats.of([1.0]))
    final = RoundSummary(round=0, generator="round 1 policy", eval_scores=ScoreStats.of([2.0]))
    table = format_round_table([final, round1, warmup]).splitlines()
    assert len(table) == 5  # header, rule, start, round 0, round 1
    assert table[2].startswith("| start | 0.000")
    assert table[3].startswith("| round 0 (DPO warm-up) | 1.000")
    assert table[4].startswith("| round 1 | 2.000")
    write_round_report(tmp_path / "r0", warmup, [])
    assert read_summary(tmp_path / "r0") == warmup
    assert "# SELM Round 0 (DPO warm-up" in (tmp_path / "r0" / "report.md").read_text()
