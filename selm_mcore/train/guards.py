"""What keeps a round's training trustworthy: the run a resume must match, and the stop on a
non-finite step (used by ``selm_mcore.train.trainer``; plain Python, no process groups).

    identity = run_identity(cfg, start_model=fp, data_hash=h, steps=n)   # stored in checkpoints
    check_resume(checkpoint, saved_identity, identity)                   # ResumeError if differs
    loss_fn = loss_fn_for_step(loss_fn, step)                            # the NaN fault hook
    raise_non_finite(output_dir, step, "the loss is nan", metrics, lr=lr, applied=False)

The run identity holds the start model's fingerprint (``selm_mcore.train.refpass.
reference_fingerprint``), the data hash, the number of steps, the loss and the optimizer with
its schedule; nothing that depends on the layout (tp/pp/vpp/dp, data.packing), since every
layout trains the same run.

Fault hook (tests): with ``SELM_TRAIN_NAN_AT_STEP=k`` the loss of step k is multiplied by NaN
(so are its gradients), as a diverging run would.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import SelmConfig
from selm_mcore.runtime.errors import UserError

logger = logging.getLogger(__name__)

NAN_AT_STEP_ENV = "SELM_TRAIN_NAN_AT_STEP"
_RESUME_FIX = (
    "resume with the checkpoint's settings, or start over with train.resume=false or "
    "another train.output_dir"
)
# Keys of ``run_identity`` that are no config key, worded for an error message.
IDENTITY_LABELS = {
    "start_model": "the start model (train.init_from / model.hf_dir; its weights' fingerprint)",
    "data": "the training data (data.train_path as tokenised and truncated; its hash)",
    "steps": "the number of steps (train.max_steps / train.epochs with the data size)",
    "peak_lr": "the peak learning rate (optim.lr, or optim.lr_per_round[train.round_index-1])",
}


# --- the run a resume must match --------------------------------------------------------------


def run_identity(
    cfg: SelmConfig, *, start_model: str, data_hash: str, steps: int
) -> dict[str, Any]:
    """What defines a round's training (JSON values), stored in its step checkpoints."""
    return {
        "start_model": start_model,
        "data": data_hash,
        "steps": steps,
        "model.dtype": cfg.model.dtype,
        **{f"loss.{k}": getattr(cfg.loss, k) for k in ("beta", "alpha", "loss_type", "sft_weight")},
        "train.round_index": cfg.train.round_index,
        "peak_lr": cfg.optim.lr_for_round(cfg.train.round_index),
        **{
            f"optim.{k}": getattr(cfg.optim, k)
            for k in (
                "min_lr",
                "weight_decay",
                "adam_beta1",
                "adam_beta2",
                "adam_eps",
                "schedule",
                "warmup_ratio",
                "clip_grad",
            )
        },
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.seed": cfg.train.seed,
        "data.shuffle": cfg.data.shuffle,
    }


def _show(value: Any) -> str:
    return f"{value[:12]}..." if isinstance(value, str) and len(value) == 64 else repr(value)


def check_resume(path: str | Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume checkpoint ``path`` (``saved``: its run identity) in another run,
    naming every key that differs, both values and the fix."""
    from selm_mcore.mcore.checkpoint import ResumeError

    if saved is None:
        raise ResumeError(
            f"cannot resume from {path}: it does not record what defines its run "
            f"(saved by an older version); {_RESUME_FIX}"
        )
    differ = [
        f"{IDENTITY_LABELS.get(key, key)}: checkpoint {_show(saved.get(key))}, this run "
        f"{_show(current.get(key))}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differ:
        raise ResumeError(
            f"cannot resume from {path}: this run differs from the one that saved "
            f"it in {'; '.join(differ)}. Fix: {_RESUME_FIX}"
        )


# --- non-finite steps -------------------------------------------------------------------------


class NonFiniteError(UserError, RuntimeError):
    """A step whose loss, gradients or parameters are NaN or infinite: the run stops."""

    def __init__(self, message: str, step: int, metrics: dict[str, float]):
        super().__init__(message)
        self.step, self.metrics = step, metrics


def _poisoned_loss(loss_fn, *args, **kwargs):
    loss, sums = loss_fn(*args, **kwargs)
    return loss * float("nan"), {**sums, "loss": sums["loss"] * float("nan")}


def loss_fn_for_step(loss_fn, step: int):
    """``loss_fn``, or at the step ``SELM_TRAIN_NAN_AT_STEP`` names, one whose loss is NaN."""
    value = os.environ.get(NAN_AT_STEP_ENV)
    if value and int(value) == step:
        logger.warning("%s=%s: the loss of step %d is made NaN", NAN_AT_STEP_ENV, value, step)
        return functools.partial(_poisoned_loss, loss_fn)
    return loss_fn


def raise_non_finite(
    output_dir: str | Path,
    step: int,
    what: str,
    metrics: dict[str, float],
    *,
    lr: float,
    applied: bool,
) -> None:
    """Raise ``NonFiniteError`` for ``step``, naming the last good checkpoint and what to try."""
    from selm_mcore.mcore.checkpoint import ResumeError
    from selm_mcore.mcore.step_checkpoints import find_latest

    try:
        latest = find_latest(Path(output_dir) / "checkpoints")
    except ResumeError:
        latest = None
    kept = (
        f"the last good checkpoint {latest} stays `latest`"
        if latest is not None
        else "no step checkpoint was saved before it (train.save_interval keeps some)"
    )
    update = (
        "its update was applied (the parameters in memory are not saved)"
        if applied
        else "its update was not applied"
    )
    raise NonFiniteError(
        f"training stopped at step {step}: {what}; {update}, nothing was saved and no final "
        f"model was written; {kept}. Try: start over with a lower optim.lr ({lr:.3g} at this "
        "step), optim.clip_grad > 0 or model.dtype=fp32, or check the rows of this step in "
        "data.train_path (with train.resume=false or another train.output_dir); if the fault "
        "was transient, run the same command again to resume from `latest`",
        step,
        metrics,
    )
