"""Per-round reports of the online loop: what the ranker thinks of the policy, what training did.

For each round ``selm run`` writes ``round_t/report/`` with

* ``summary.json``  the numbers below (read back for the final table);
* ``report.md``     a markdown summary linking the plots;
* ``scores.png``    the ranker's score distribution of each policy's greedy responses on the
                    held-out prompts, all policies so far overlaid (the paper's Figure 3);
* ``rewards.png``   the implicit rewards beta * (logp_pi - logp_ref) of chosen and rejected
                    responses per training step.

Numbers: held-out score statistics (mean, std, quantiles) of the round's generator, the win
counts of y_ref against the original pair (how often the ranker made y_ref the new chosen or the
new rejected response, and how often the original chosen response lost its place), and the
training summary (mean implicit rewards, reward accuracy, margins, first/last loss).

At the end of ``selm run``, ``format_round_table`` prints one row per policy: ``start`` is the
initial policy, ``round t`` the policy that round t trained, with the statistics of that round's
data and training (``round 0 (DPO warm-up)`` first, when online.warmup_dpo_round is set). Plots
need matplotlib (``pip install 'selm-mcore[reports]'``); they use the
Agg backend and never open a window.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selm_mcore.runtime.files import read_records
from selm_mcore.runtime.outputs import temp_path_for

# Candidate order in a ranked triple, as the reference code: [y_ref, y_w, y_l].
YREF, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class ScoreStats:
    """Summary of one policy's held-out scores (higher is better).

    ``positive``: the share of scores > 0. With PairRM (scored against the held-out chosen
    response) that is the win rate over it; with the verifiable ranker, the share of correct
    answers.
    """

    n: int
    mean: float
    std: float
    median: float
    p10: float
    p90: float
    positive: float = 0.0

    @classmethod
    def of(cls, scores: Sequence[float]) -> ScoreStats:
        if not scores:
            raise ValueError("no scores to summarise (is the held-out prompt set empty?)")
        ordered = sorted(float(s) for s in scores)
        return cls(
            n=len(ordered),
            mean=statistics.fmean(ordered),
            std=statistics.pstdev(ordered),
            median=statistics.median(ordered),
            p10=_quantile(ordered, 0.1),
            p90=_quantile(ordered, 0.9),
            positive=sum(s > 0 for s in ordered) / len(ordered),
        )


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default)."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class WinCounts:
    """Where y_ref landed when ranked against the original pair [y_ref, y_w, y_l].

    ``yref_chosen``: y_ref became the new chosen response (best, ties included);
    ``yref_rejected``: it became the new rejected response; ``yref_dropped``: neither.
    ``original_kept``: the pair is exactly the original (y_w, y_l); ``original_flipped``:
    the original chosen response became the rejected one; ``full_ties``: chosen == rejected;
    ``dropped_empty``: pairs left out of training for an empty response (set by the caller).
    """

    pairs: int = 0
    yref_chosen: int = 0
    yref_rejected: int = 0
    yref_dropped: int = 0
    original_kept: int = 0
    original_flipped: int = 0
    full_ties: int = 0
    dropped_empty: int = 0

    @classmethod
    def of(cls, selections: Sequence[tuple[int, int]]) -> WinCounts:
        """From (chosen index, rejected index) per row, indices into [y_ref, y_w, y_l]."""
        counts = cls()
        for chosen, rejected in selections:
            counts.pairs += 1
            if chosen == rejected:
                counts.full_ties += 1
            if chosen == YREF:
                counts.yref_chosen += 1
            elif rejected == YREF:
                counts.yref_rejected += 1
            else:
                counts.yref_dropped += 1
            if (chosen, rejected) == (CHOSEN, REJECTED):
                counts.original_kept += 1
            if rejected == CHOSEN:
                counts.original_flipped += 1
        return counts


@dataclass
class TrainStats:
    """Means over one round's logged steps of the trainer's metrics (``metrics.jsonl``).

    None marks a metric the trainer did not log (kept out of JSON as null, not NaN).
    """

    steps: int = 0
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    accuracy: float | None = None
    margin: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None

    @classmethod
    def of(cls, records: Sequence[dict[str, Any]]) -> TrainStats:
        records = [r for r in records if "loss" in r]
        if not records:
            return cls()

        def mean(key: str) -> float | None:
            values = [r[key] for r in records if key in r]
            return statistics.fmean(values) if values else None

        return cls(
            steps=len(records),
            rewards_chosen=mean("rewards/chosen"),
            rewards_rejected=mean("rewards/rejected"),
            accuracy=mean("rewards/accuracies"),
            margin=mean("rewards/margins"),
            loss_first=records[0]["loss"],
            loss_last=records[-1]["loss"],
        )


@dataclass
class RoundSummary:
    """Everything the report of one round says; ``round`` 0 labels the final evaluation, or,
    with ``warmup``, the offline DPO warm-up round that precedes the SELM rounds."""

    round: int
    generator: str  # which policy generated this round's data and scores
    eval_scores: ScoreStats | None = None
    eval_score_values: list[float] = field(default_factory=list)
    wins: WinCounts | None = None
    train: TrainStats | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    warmup: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundSummary:
        return cls(
            round=data["round"],
            generator=data["generator"],
            eval_scores=ScoreStats(**data["eval_scores"]) if data.get("eval_scores") else None,
            eval_score_values=list(data.get("eval_score_values", [])),
            wins=WinCounts(**data["wins"]) if data.get("wins") else None,
            train=TrainStats(**data["train"]) if data.get("train") else None,
            phase_seconds=dict(data.get("phase_seconds", {})),
            warmup=bool(data.get("warmup", False)),
        )


# --- plots -------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "report plots need matplotlib: pip install 'selm-mcore[reports]'"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_score_distributions(
    distributions: Mapping[str, Sequence[float]],
    out_png: str | os.PathLike,
    title: str = "Ranker scores of greedy responses on held-out prompts",
) -> None:
    """Overlaid step histograms, one per policy (the paper's Figure 3), with the means marked."""
    plt = _pyplot()
    values = [v for scores in distributions.values() for v in scores]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if values:
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        bins = [low + (high - low) * i / 20 for i in range(21)]
        for index, (label, scores) in enumerate(distributions.items()):
            color = f"C{index}"
            ax.hist(
                list(scores),
                bins=bins,
                histtype="step",
                linewidth=1.8,
                color=color,
                label=f"{label} (mean {statistics.fmean(scores):.3g})",
            )
            ax.axvline(statistics.fmean(scores), color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("ranker score")
    ax.set_ylabel("held-out prompts")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out_png)
    plt.close(fig)


def plot_implicit_rewards(
    records: Sequence[dict[str, Any]], out_png: str | os.PathLike, title: str
) -> None:
    """rewards/chosen and rewards/rejected (beta * log-ratio) per optimizer step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, color in (("rewards/chosen", "C2"), ("rewards/rejected", "C3")):
        points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=key)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("implicit reward  beta * (logp_pi - logp_ref)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out_png)
    plt.close(fig)


def _save_figure(fig, out_png: str | os.PathLike) -> None:
    with temp_path_for(out_png, ".png") as tmp:  # savefig picks the format by the suffix
        fig.savefig(tmp)
        os.replace(tmp, out_png)


# --- the markdown report -----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def render_markdown(summary: RoundSummary, history: Sequence[RoundSummary]) -> str:
    """The round's report.md (``history``: earlier rounds' summaries, for the score table)."""
    if summary.warmup:
        title = f"Round {summary.round} (DPO warm-up on the original pairs)"
    else:
        title = f"Round {summary.round}" if summary.round else "Final policy"
    lines = [f"# SELM {title}", "", f"Generator: {summary.generator}", ""]
    lines += [
        "## Held-out scores (greedy responses, ranker scores)",
        "",
        "| policy | n | mean | std | p10 | median | p90 | share > 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in [*history, summary]:
        s = item.eval_scores
        if s is not None:
            lines.append(
                f"| {item.generator} | {s.n} | {_fmt(s.mean)} | {_fmt(s.std)} | "
                f"{_fmt(s.p10)} | {_fmt(s.median)} | {_fmt(s.p90)} | "
                f"{s.positive:.3f} |"
            )
    lines += ["", "![score distributions](scores.png)", ""]
    if summary.wins is not None:
        w = summary.wins
        lines += [
            "## y_ref against the original pair",
            "",
            f"- pairs: {w.pairs}",
            f"- y_ref became chosen: {w.yref_chosen}; rejected: {w.yref_rejected}; "
            f"dropped: {w.yref_dropped}",
            f"- original pair kept: {w.original_kept}; original chosen became rejected: "
            f"{w.original_flipped}; full ties (chosen == rejected): {w.full_ties}",
            f"- left out of training for an empty response: {w.dropped_empty}",
            "",
        ]
    if summary.train is not None and summary.train.steps:
        t = summary.train
        lines += [
            "## Training",
            "",
            f"- steps: {t.steps}; loss {_fmt(t.loss_first)} -> {_fmt(t.loss_last)}",
            f"- mean implicit rewards: chosen {_fmt(t.rewards_chosen)}, rejected "
            f"{_fmt(t.rewards_rejected)}; accuracy {_fmt(t.accuracy, 3)}; margin "
            f"{_fmt(t.margin)}",
            "",
            "![implicit rewards](rewards.png)",
            "",
        ]
    if summary.phase_seconds:
        lines += ["## Phase times", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.1f} |" for name, seconds in summary.phase_seconds.items()]
        lines.append("")
    return "\n".join(lines)


def write_round_report(
    out_dir: str | os.PathLike,
    summary: RoundSummary,
    history: Sequence[RoundSummary],
    train_records: Sequence[dict[str, Any]] = (),
) -> None:
    """Write summary.json, report.md, scores.png and (when trained) rewards.png into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    distributions = {
        item.generator: item.eval_score_values
        for item in [*history, summary]
        if item.eval_score_values
    }
    plot_score_distributions(distributions, out_dir / "scores.png")
    if train_records:
        plot_implicit_rewards(
            train_records, out_dir / "rewards.png", f"Round {summary.round}: implicit rewards"
        )
    (out_dir / "report.md").write_text(render_markdown(summary, history))
    (out_dir / "summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")


def read_summary(report_dir: str | os.PathLike) -> RoundSummary:
    return RoundSummary.from_json(json.loads((Path(report_dir) / "summary.json").read_text()))


# --- the final table ---------------------------------------------------------------------------


TABLE_COLUMNS = (
    "policy",
    "held-out score",
    "score > 0",
    "pairs",
    "y_ref chosen/rejected/dropped",
    "orig. flipped",
    "reward chosen",
    "reward rejected",
    "reward acc",
    "loss first->last",
    "round time (s)",
)


def format_round_table(summaries: Sequence[RoundSummary]) -> str:
    """One markdown row per policy: start, then the policy trained in each round (a DPO
    warm-up round 0 first, when the run has one).

    A round's summary holds the scores of its *generator* (the previous policy), so the scores of
    the policy round t trained come from round t+1's summary or the final evaluation.
    """
    rounds = sorted((s for s in summaries if s.round > 0 or s.warmup), key=lambda s: s.round)
    final = [s for s in summaries if s.round == 0 and not s.warmup]
    scored_by = {}  # round that trained the policy (start: the first round - 1) -> its scores
    for s in rounds:
        scored_by[s.round - 1] = s.eval_scores
    if final and rounds:
        scored_by[rounds[-1].round] = final[0].eval_scores
    start = rounds[0].round - 1 if rounds else 0

    def score(index: int) -> list[str]:
        stats = scored_by.get(index)
        if stats is None:
            return ["-", "-"]
        return [f"{stats.mean:.3f} ± {stats.std:.3f} (n={stats.n})", f"{stats.positive:.3f}"]

    rows = [["start", *score(start), "", "", "", "", "", "", "", ""]]
    for s in rounds:
        w, t = s.wins, s.train
        rows.append(
            [
                f"round {s.round}" + (" (DPO warm-up)" if s.warmup else ""),
                *score(s.round),
                str(w.pairs) if w else "-",
                f"{w.yref_chosen}/{w.yref_rejected}/{w.yref_dropped}" if w else "-",
                str(w.original_flipped) if w else "-",
                _fmt(t.rewards_chosen) if t else "-",
                _fmt(t.rewards_rejected) if t else "-",
                _fmt(t.accuracy, 3) if t else "-",
                f"{_fmt(t.loss_first)}->{_fmt(t.loss_last)}" if t and t.steps else "-",
                f"{sum(s.phase_seconds.values()):.0f}" if s.phase_seconds else "-",
            ]
        )
    header = "| " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    return "\n".join([header, rule, *("| " + " | ".join(r) + " |" for r in rows)])


def format_phase_times(phase_seconds: dict[str, float]) -> str:
    """A markdown table of seconds per phase kind (rows) and round (columns), from the
    manifest's ``{"round1/generate": 12.3, ..., "final/rank": 4.5}``."""
    groups: list[str] = []
    kinds: list[str] = []
    for name in phase_seconds:
        group, kind = name.split("/", 1)
        groups += [group] if group not in groups else []
        kinds += [kind] if kind not in kinds else []
    header = "| phase | " + " | ".join(groups) + " | total |"
    rule = "|" + "|".join("---" for _ in range(len(groups) + 2)) + "|"
    lines = [header, rule]
    for kind in [*kinds, "total"]:
        cells = []
        for group in groups:
            value: float | None
            if kind == "total":
                value = sum(v for n, v in phase_seconds.items() if n.startswith(group + "/"))
            else:
                value = phase_seconds.get(f"{group}/{kind}")
            cells.append("-" if value is None else f"{value:.1f}")
        total = sum(
            v for n, v in phase_seconds.items() if kind == "total" or n.endswith("/" + kind)
        )
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {total:.1f} |")
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    *,
    round_index: int,
    generator: str,
    rank_dir: Path,
    train_dir: Path | None,
    history_dirs: list[Path],
    phase_seconds: dict[str, float],
    warmup: bool = False,
) -> None:
    """The report of one round (or of the final evaluation, round_index 0 without warmup) from
    the outputs of its rank phase (held-out scores, win counts) and train phase (metrics)."""
    summary = RoundSummary(
        round=round_index, generator=generator, phase_seconds=phase_seconds, warmup=warmup
    )
    if (rank_dir / "eval_scores.jsonl").is_file():
        scores = [row["score"] for row in read_records(rank_dir / "eval_scores.jsonl")]
        summary.eval_score_values = scores
        summary.eval_scores = ScoreStats.of(scores)
    if (rank_dir / "stats.jsonl").is_file():
        stats = read_records(rank_dir / "stats.jsonl")
        summary.wins = WinCounts.of([(row["chosen_index"], row["rejected_index"]) for row in stats])
        summary.wins.dropped_empty = sum(bool(row.get("dropped_empty")) for row in stats)
    records = []
    if train_dir is not None:
        metrics_path = train_dir / "metrics.jsonl"
        records = read_records(metrics_path) if metrics_path.exists() else []
        summary.train = TrainStats.of(records)
    history = [read_summary(d) for d in history_dirs]
    write_round_report(out_dir, summary, history, records)
