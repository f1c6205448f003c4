"""What a round publishes besides its training: the policy as an HF folder with a model card,
its benchmark answers, the final policy's link, and the run's W&B points.

Phases (built for ``selm_mcore.loop.rounds.RoundPhases``, which calls these):

    roundT/export   round_T/policy_hf     the policy after round T (Megatron -> HF) + README.md
    start/eval      start/eval            benchmarks of model.hf_dir      (online.eval set)
    roundT/eval     round_T/eval          benchmarks of round_T/policy_hf (``selm eval``)
    final/export    final/policy_hf       a link to the last round's policy_hf (always)

Round T+1 generates from ``round_T/policy_hf``. The round's report phase then adds the
benchmark table and plot to its report, rewrites the policy's model card with them
(``model_card``) and, with W&B on, logs the round's point (``after_report``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.portions import first_round
from selm_mcore.eval.cli import read_eval_summary
from selm_mcore.eval.report import Row, eval_markdown, format_eval_table, plot_eval
from selm_mcore.loop.model_card import CARD, write_model_card
from selm_mcore.loop.runner import Manifest, Phase, selm_command
from selm_mcore.runtime.outputs import open_log

logger = logging.getLogger(__name__)


def run_name(cfg: SelmConfig) -> str:
    """The run's name: train.wandb_name, else the workdir's folder name."""
    return cfg.train.wandb_name or Path(cfg.online.workdir).absolute().name


def policy_label(cfg: SelmConfig, t: int) -> str:
    return "round 0 (DPO warm-up)" if t == 0 and cfg.online.warmup_dpo_round else f"round {t}"


def answers_name(cfg: SelmConfig, t: int | None) -> str:
    """The model name in round t's answer files (None: the start model)."""
    base = cfg.eval.model_name or run_name(cfg)
    return f"{base}-start" if t is None else f"{base}-round{t}"


def child_env(cfg: SelmConfig, workdir: Path, phase: str) -> dict[str, str]:
    """Environment of a phase's command: W&B run folders under the workdir, the run's group,
    the phase's round in the W&B run name (``<run>-round1``)."""
    if not cfg.train.wandb_project:
        return {}
    return {
        "WANDB_DIR": str(workdir / "wandb"),
        "WANDB_RUN_GROUP": run_name(cfg),
        "WANDB_NAME": f"{run_name(cfg)}-{phase.split('/')[0]}",
    }


def eval_sources(cfg: SelmConfig) -> list[tuple[str, str]]:
    """(config key, source) of the benchmark files the run's eval phases read (set ones)."""
    keys = {"alpaca_eval": ("alpaca_eval_prompts", "alpaca_eval_reference"),
            "mt_bench": ("mt_bench_questions", "mt_bench_reference")}  # fmt: skip
    return [
        (f"eval.{key}", getattr(cfg.eval, key))
        for name in cfg.online.eval
        for key in keys[name]
        if getattr(cfg.eval, key)
    ]


def check_eval_inputs(cfg: SelmConfig) -> None:
    """Before any phase: the judge suits the benchmarks and their files read (a missing file
    fails now, not after round 1)."""
    if not cfg.online.eval:
        return
    from selm_mcore.eval.benchmarks import read_benchmark, read_references
    from selm_mcore.eval.cli import check_eval_config

    check_eval_config(cfg, cfg.online.eval)
    for name in cfg.online.eval:
        read_references(name, cfg.eval, read_benchmark(name, cfg.eval))


def export_phase(plan, t: int) -> Phase:
    """``roundT/export``: the policy after round T as an HF folder with its model card."""
    name, out = f"round{t}/export", plan.paths.round_dir(t) / "policy_hf"

    def run(partial: Path) -> None:
        plan.run_child(
            name,
            selm_command(
                "convert",
                "mcore-to-hf",
                "--mcore-dir",
                str(plan.paths.round_dir(t) / "train" / "final"),
                "--out-dir",
                str(partial),
                "--tp",
                str(plan.cfg.online.export_tp),
            ),
        )
        write_card(plan, t, partial, eval_rows=None)

    return Phase(name, plan.paths.rel(out), run, unhashed=(CARD,))


def write_card(plan, t: int, folder: Path, eval_rows: list[Row] | None) -> None:
    write_model_card(
        folder,
        plan.cfg,
        round_label=policy_label(plan.cfg, t),
        round_index=t,
        warmup=t == 0,
        train_dir=plan.paths.round_dir(t) / "train",
        eval_rows=eval_rows,
    )


def eval_dir(plan, t: int | None) -> Path:
    return plan.paths.workdir / "start" / "eval" if t is None else plan.paths.round_dir(t) / "eval"


def eval_phase(plan, t: int | None) -> Phase:
    """``start/eval`` (t None: model.hf_dir) or ``roundT/eval``: ``selm eval`` of the policy."""
    name = "start/eval" if t is None else f"round{t}/eval"
    model = (
        Path(plan.cfg.model.hf_dir).absolute()
        if t is None
        else plan.paths.round_dir(t) / "policy_hf"
    )

    def run(partial: Path) -> None:
        partial.mkdir()
        benchmarks = [arg for b in plan.cfg.online.eval for arg in ("--benchmark", b)]
        plan.run_child(
            name,
            selm_command(
                "eval",
                str(plan.paths.config),
                "--model",
                str(model),
                *benchmarks,
                "--out",
                str(partial),
                "--publish-dir",
                str(eval_dir(plan, t)),
                "--model-name",
                answers_name(plan.cfg, t),
            ),
        )

    return Phase(name, plan.paths.rel(eval_dir(plan, t)), run)


def final_export_phase(plan, last: int) -> Phase:
    """``final/export``: ``final/policy_hf``, a relative link to the last round's policy_hf."""
    out = plan.paths.final_dir / "policy_hf"
    target = plan.paths.round_dir(last) / "policy_hf"

    def run(partial: Path) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, partial.parent), partial)

    return Phase("final/export", plan.paths.rel(out), run, unhashed=(CARD,))


def eval_rows(plan, upto: int) -> list[Row]:
    """(label, eval summary) of the start model and every round up to ``upto`` that has one."""
    rows: list[Row] = [("start", read_eval_summary(eval_dir(plan, None)))]
    for t in range(first_round(plan.cfg), upto + 1):
        rows.append((policy_label(plan.cfg, t), read_eval_summary(eval_dir(plan, t))))
    return [(label, summary) for label, summary in rows if summary is not None]


def after_report(plan, manifest: Manifest, t: int, report_dir: Path) -> None:
    """The round's report phase, after the report: benchmarks into the report and the model
    card, the round's point to W&B."""
    rows = eval_rows(plan, t) if plan.cfg.online.eval else []
    if rows:
        plot_eval(rows, report_dir / "eval.png")
        with open_log(report_dir / "report.md") as handle:
            handle.write("\n" + eval_markdown(rows))
        write_card(plan, t, plan.paths.round_dir(t) / "policy_hf", eval_rows=rows)
    from selm_mcore.train.wandb_log import wandb_enabled

    if wandb_enabled(plan.cfg):
        _log_wandb(plan, manifest, t, report_dir, rows)


def _benchmark_metrics(summary: dict[str, Any] | None) -> dict[str, float]:
    out = {}
    for name, entry in (summary or {}).get("benchmarks", {}).items():
        if entry.get("win_rate") is not None:
            out[f"eval/{name}/win_rate"] = entry["win_rate"]
        out[f"eval/{name}/mean_length"] = entry["mean_length"]
        for key, value in ((entry.get("official") or {}).get("result") or {}).items():
            out[f"eval/{name}/official_{key}"] = value
    return out


def _round_metrics(report_dir: Path) -> dict[str, float]:
    summary = json.loads((report_dir / "summary.json").read_text())
    out: dict[str, float] = {"round": float(summary["round"])}
    for section, prefix in (("train", "round/train_"), ("wins", "round/pairs_")):
        for key, value in (summary.get(section) or {}).items():
            if isinstance(value, (int, float)) and value is not None:
                out[prefix + key] = float(value)
    scores = summary.get("eval_scores") or {}
    for key in ("mean", "std", "positive"):
        if key in scores:  # the held-out scores of the round's generator (the policy before)
            out[f"heldout/generator_{key}"] = float(scores[key])
    return out


def _log_wandb(plan, manifest: Manifest, t: int, report_dir: Path, rows: list[Row]) -> None:
    from selm_mcore.train.wandb_log import log_round_summary, new_run_id

    if "wandb_run_id" not in manifest.data:
        manifest.data["wandb_run_id"] = new_run_id()
        manifest.save()
    step = t - first_round(plan.cfg) + 1  # 0 = the start model
    by_label = dict(rows)
    points: list[tuple[int, dict[str, float], dict[str, Path]]] = []
    if step == 1:
        points.append((0, {"round": -1.0, **_benchmark_metrics(by_label.get("start"))}, {}))
    images = {f"report/{n}": report_dir / f"{n}.png" for n in ("scores", "rewards", "eval")}
    metrics = {**_round_metrics(report_dir),
               **_benchmark_metrics(by_label.get(policy_label(plan.cfg, t)))}  # fmt: skip
    points.append((step, metrics, images))
    log_round_summary(
        plan.cfg,
        run_id=manifest.data["wandb_run_id"],
        name=run_name(plan.cfg),
        directory=plan.paths.workdir / "wandb",
        points=points,
    )


def closing_lines(plan) -> str:
    """What ``selm run`` prints last: the benchmark table per policy, the official judges'
    commands of the last evaluated policy, and where the final policy is."""
    last = plan.cfg.online.rounds
    lines = []
    rows = eval_rows(plan, last) if plan.cfg.online.eval else []
    if rows:
        lines += ["", "Benchmarks per policy (offline judge; eval/summary.json of each):",
                  format_eval_table(rows)]  # fmt: skip
        official = (rows[-1][1] or {}).get("benchmarks", {})
        for name, entry in official.items():
            command = (entry.get("official") or {}).get("command")
            if command:
                lines.append(f"official {name} judge of {rows[-1][0]}: {command}")
    final = plan.paths.final_dir / "policy_hf"
    if final.exists():
        lines.append(f"final policy (HF, with its model card): {final} -> {final.resolve()}")
    return "\n".join(lines)
