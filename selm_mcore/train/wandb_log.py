"""Weights & Biases logging: the step metrics of each training round, each round's summary and
its report images.

    run = open_training_run(cfg, output_dir)          # selm train, rank 0; None when W&B is off
    run.log(step, {"loss": ..., ...}); run.finish()
    log_round_summary(cfg, run_id, workdir, step, metrics, images)   # selm run, per round

W&B is on when ``train.wandb_project`` is set and ``train.wandb_mode`` is not "disabled"
(``online``; ``offline`` writes run folders for a later ``wandb sync``). A SELM run is a W&B
group (``train.wandb_name``, by default the workdir's folder name):

* each round's training is one W&B run of that group, named ``<name>-round<t>`` (job type
  ``train``), logging at every optimizer step the same metrics TensorBoard gets, under the same
  names (``train/loss``, ``rewards/chosen``, ...); its id is kept in the round's training folder
  (``wandb_run_id``), so a resumed round continues its run (W&B drops the steps it already has);
* the run itself (job type ``selm-run``, named ``<name>``) gets one point per policy at its
  report: the round's training summary, the ranker's view of its pairs, the held-out scores
  and the benchmarks, plus the report images (score distributions, implicit rewards,
  benchmarks). Its id is kept in the manifest.

Run folders go to ``WANDB_DIR`` (``selm run`` sets ``<workdir>/wandb`` for its phases), else the
training folder.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import SelmConfig

logger = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


def wandb_enabled(cfg: SelmConfig) -> bool:
    return bool(cfg.train.wandb_project) and cfg.train.wandb_mode != "disabled"


def _import_wandb():
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(
            "train.wandb_project needs the wandb package: pip install 'selm-mcore[logging]' "
            "(or set train.wandb_project='')"
        ) from exc
    return wandb


def new_run_id() -> str:
    """A fresh W&B run id (8 lower-case letters and digits, as W&B makes them)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbRun:
    """One open W&B run; ``log`` takes the metrics dict the step writer logs."""

    def __init__(self, run: Any):
        self.run = run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({_name(k): v for k, v in metrics.items()}, step=step)

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        wandb = _import_wandb()
        found = {k: wandb.Image(str(p)) for k, p in images.items() if Path(p).is_file()}
        if found:
            self.run.log(found, step=step)

    def finish(self) -> None:
        self.run.finish()


def _name(key: str) -> str:
    """TensorBoard's tag for a metric (``selm_mcore.train.metrics``): section/name."""
    return key if "/" in key else f"train/{key}"


def open_run(
    cfg: SelmConfig, *, name: str, job_type: str, run_id: str, directory: Path | None
) -> WandbRun:
    """Start (or resume, same ``run_id``) a W&B run of the config's project."""
    wandb = _import_wandb()
    folder = None if os.environ.get("WANDB_DIR") else directory
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=cfg.train.wandb_project,
        entity=cfg.train.wandb_entity or None,
        name=name,
        group=os.environ.get("WANDB_RUN_GROUP") or cfg.train.wandb_name or None,
        job_type=job_type,
        id=run_id,
        resume="allow",
        dir=str(folder) if folder is not None else None,
        mode=cfg.train.wandb_mode,
        config=cfg.to_dict(),
        settings=wandb.Settings(console="off", silent=True),
    )
    return WandbRun(run)


def open_training_run(cfg: SelmConfig, output_dir: Path) -> WandbRun | None:
    """The W&B run of one training round (rank 0 of ``selm train``); None when W&B is off.
    Its id is read from (or written to) ``output_dir/wandb_run_id``."""
    if not wandb_enabled(cfg):
        return None
    id_file = Path(output_dir) / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        from selm_mcore.runtime.files import write_text_atomic

        run_id = new_run_id()
        write_text_atomic(id_file, run_id + "\n")
    name = (
        os.environ.get("WANDB_NAME")  # selm run: <run>-round<t>
        or cfg.train.wandb_name
        or f"selm-round{cfg.train.round_index}"
    )
    return open_run(cfg, name=name, job_type="train", run_id=run_id, directory=Path(output_dir))


def log_round_summary(
    cfg: SelmConfig,
    *,
    run_id: str,
    name: str,
    directory: Path,
    points: list[tuple[int, dict[str, float], dict[str, Path]]],
) -> None:
    """Log (step, metrics, images) points to the run-level W&B run, then close it."""
    run = open_run(cfg, name=name, job_type="selm-run", run_id=run_id, directory=directory)
    try:
        for step, metrics, images in points:
            run.run.log(metrics, step=step)
            run.log_images(step, images)
    finally:
        run.finish()
