"""The model card (``README.md``) of an exported policy folder, so ``hf upload`` publishes a
documented model.

    write_model_card(folder, cfg, round_label="round 2", round_index=2, train_dir=...,
                     eval_rows=[("start", summary), ("round 1", ...), ...])

The card says what the model is (the base model, which round of how many), how it was trained
(the SELM settings: data and its portion, ranker, loss, optimizer, batch, generation), what the
round's training did (``reports.TrainStats`` of its metrics) and, when the run evaluates its
rounds (``online.eval``), the benchmark table up to this round. The export phase writes it with
what is known then; the round's report phase rewrites it once the benchmarks are in (the
export phase leaves README.md out of its output hash for that reason).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.hub import is_hub_source, parse_hub_source
from selm_mcore.eval.report import Row, format_eval_table
from selm_mcore.loop.reports import TrainStats, _fmt
from selm_mcore.runtime.files import read_records, write_text_atomic

CARD = "README.md"


def _base_model(cfg: SelmConfig) -> str:
    """The start model's hub name when its config records one, else its folder name."""
    config = Path(cfg.model.hf_dir) / "config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("_name_or_path", "")
        if name and "/" in name and not Path(name).is_absolute() and not Path(name).exists():
            return name
    return Path(cfg.model.hf_dir).name or "unknown"


def _front_matter(cfg: SelmConfig) -> list[str]:
    lines = ["---", f"base_model: {_base_model(cfg)}", "library_name: transformers"]
    lines += ["tags:", "- selm", "- dpo", "- online-dpo", "- selm-mcore"]
    if is_hub_source(cfg.data.train_path):
        lines += ["datasets:", f"- {parse_hub_source(cfg.data.train_path).repo_id}"]
    return lines + ["---", ""]


def _settings(cfg: SelmConfig, round_index: int, warmup: bool) -> list[str]:
    rounds = cfg.online.rounds + (1 if cfg.online.warmup_dpo_round else 0)
    schedule_index = round_index + (1 if cfg.online.warmup_dpo_round else 0)
    alpha = 0.0 if warmup else cfg.loss.alpha
    rows = [
        ("training data", f"{cfg.data.train_path} (portion {schedule_index} of {rounds})"),
        ("ranker", cfg.ranking.kind + ("" if cfg.ranking.kind == "verifiable"
                                       else f" ({cfg.ranking.model_path})")),
        ("loss", f"{cfg.loss.loss_type}, beta {cfg.loss.beta}, alpha {alpha} "
                 f"(optimism weight alpha*beta = {alpha * cfg.loss.beta:.3g})"),
        ("learning rate", f"{cfg.optim.lr_for_round(schedule_index):.3g} peak, "
                          f"{cfg.optim.schedule}, warm-up {cfg.optim.warmup_ratio}"),
        ("batch", f"{cfg.train.global_batch_size} pairs, {cfg.train.epochs} epoch(s)"),
        ("lengths", f"max {cfg.data.max_length} tokens, prompt {cfg.data.max_prompt_length}"),
        ("y_ref generation", f"temperature {cfg.generation.temperature}, "
                             f"max {cfg.generation.max_tokens} new tokens"),
        ("dtype", cfg.model.dtype),
    ]  # fmt: skip
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _train_lines(train_dir: Path | None) -> list[str]:
    metrics = train_dir / "metrics.jsonl" if train_dir is not None else None
    if metrics is None or not metrics.is_file():
        return ["No training metrics recorded."]
    stats = TrainStats.of(read_records(metrics))
    return [
        f"- optimizer steps: {stats.steps}; loss {_fmt(stats.loss_first)} -> "
        f"{_fmt(stats.loss_last)}",
        f"- mean implicit rewards: chosen {_fmt(stats.rewards_chosen)}, rejected "
        f"{_fmt(stats.rewards_rejected)}; reward accuracy {_fmt(stats.accuracy, 3)}; margin "
        f"{_fmt(stats.margin)}",
    ]


def render_model_card(
    cfg: SelmConfig,
    *,
    round_label: str,
    round_index: int,
    warmup: bool,
    train_dir: Path | None,
    eval_rows: Sequence[Row] | None,
) -> str:
    """The card's markdown (module docstring). ``eval_rows``: None when not evaluated yet."""
    name = cfg.eval.model_name or cfg.train.wandb_name or Path(cfg.online.workdir).name
    what = "offline DPO warm-up (Zephyr recipe)" if warmup else "SELM"
    lines = _front_matter(cfg) + [
        f"# {name}: the policy after {round_label}",
        "",
        f"The policy after {round_label} ({what}) of a {cfg.online.rounds}-round SELM run "
        "(Self-Exploring Language Models, arXiv 2405.19332: iterative online DPO with an "
        f"optimism term), trained with selm-mcore from `{_base_model(cfg)}`.",
        "",
        "## Training settings",
        "",
        *_settings(cfg, round_index, warmup),
        "",
        f"## Training of {round_label}",
        "",
        *_train_lines(train_dir),
        "",
        "## Benchmarks",
        "",
    ]
    if not cfg.online.eval:
        lines.append("Not evaluated by this run (online.eval is empty).")
    elif eval_rows is None:
        lines.append("Pending: written by the round's report once the benchmarks ran.")
    else:
        lines += [
            "Offline judge: the run's ranker compares each answer with the benchmark's "
            "reference answer (win %, ties count half); mean answer length in characters.",
            "",
            format_eval_table(eval_rows),
        ]
    lines += ["", "Produced by `selm run` (selm-mcore); the run's config is its config.yaml.", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, cfg: SelmConfig, **kwargs) -> None:
    write_text_atomic(Path(folder) / CARD, render_model_card(cfg, **kwargs))
