"""The per-round benchmark table and plot: one row (point) per policy.

    rows = [("start", read_eval_summary(start_dir)), ("round 1", ...), ...]
    print(format_eval_table(rows))
    plot_eval(rows, "eval.png")

Each benchmark gives the offline judge's win rate against its reference answers (percent, ties
count half; the judged answer turns in brackets) and the mean answer length in characters;
where an official judge ran, its headline number too (AlpacaEval 2: the length-controlled win
rate; MT-Bench: GPT-4's mean score).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = tuple[str, dict[str, Any] | None]
TITLES = {"alpaca_eval": "AlpacaEval", "mt_bench": "MT-Bench"}


def _benchmarks(rows: Sequence[Row]) -> list[str]:
    found: list[str] = []
    for _, summary in rows:
        for name in (summary or {}).get("benchmarks", {}):
            if name not in found:
                found.append(name)
    return found


def _official(entry: dict[str, Any]) -> str:
    result = (entry.get("official") or {}).get("result") or {}
    if "length_controlled_winrate" in result:
        return f"LC {result['length_controlled_winrate']:.2f}, WR {result['win_rate']:.2f}"
    if "score" in result:
        return f"{result['score']:.2f}"
    return "-"


def format_eval_table(rows: Sequence[Row]) -> str:
    """A markdown table: per policy, per benchmark win rate, mean length and official score."""
    names = _benchmarks(rows)
    header = ["policy"]
    for name in names:
        judge: dict[str, Any] = next(
            (s["benchmarks"][name] for _, s in rows if s and name in s["benchmarks"]), {}
        )
        title = TITLES.get(name, name)
        header += [
            f"{title} win % vs {judge.get('reference', 'reference')} ({judge.get('judge', '')})",
            f"{title} mean length",
            f"{title} official",
        ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, summary in rows:
        cells = [label]
        for name in names:
            entry = (summary or {}).get("benchmarks", {}).get(name)
            if entry is None:
                cells += ["-", "-", "-"]
                continue
            rate = entry.get("win_rate")
            cells += [
                f"{rate:.1f} (n={entry['judged']})" if rate is not None else "-",
                f"{entry['mean_length']:.0f}",
                _official(entry),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_eval(rows: Sequence[Row], out_png: str | os.PathLike) -> None:
    """Win rate (left) and mean answer length (right) per policy, one line per benchmark."""
    from selm_mcore.loop.reports import _pyplot, _save_figure

    plt = _pyplot()
    fig, (win_ax, length_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    labels = [label for label, _ in rows]
    for index, name in enumerate(_benchmarks(rows)):
        entries = [(summary or {}).get("benchmarks", {}).get(name) for _, summary in rows]
        points = [(x, e) for x, e in enumerate(entries) if e is not None]
        rated = [(x, e["win_rate"]) for x, e in points if e.get("win_rate") is not None]
        if rated:
            win_ax.plot(*zip(*rated), marker="o", color=f"C{index}", label=TITLES.get(name, name))
        if points:
            length_ax.plot(
                [x for x, _ in points],
                [e["mean_length"] for _, e in points],
                marker="o",
                color=f"C{index}",
                label=TITLES.get(name, name),
            )
    for ax, ylabel in ((win_ax, "win % vs reference (offline judge)"),
                       (length_ax, "mean answer length (characters)")):  # fmt: skip
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    win_ax.axhline(50.0, color="gray", linewidth=0.8)
    fig.suptitle("Benchmarks per round")
    fig.tight_layout()
    _save_figure(fig, Path(out_png))
    plt.close(fig)


def eval_markdown(rows: Sequence[Row], png_name: str = "eval.png") -> str:
    """The report's benchmark section."""
    return "\n".join(
        [
            "## Benchmarks (offline judge: the configured ranker against the reference answers)",
            "",
            format_eval_table(rows),
            "",
            f"![benchmarks]({png_name})",
            "",
        ]
    )
