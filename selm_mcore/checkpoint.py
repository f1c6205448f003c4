"""Trainer checkpoints: model + optimizer + LR scheduler + data position + RNG, saved atomically.

A checkpoint is a Megatron checkpoint folder (docs/architecture.md; the model part is written by
``selm_mcore.weights.save_model_checkpoint``) plus the training state under ``train/``::

    OUT/checkpoints/step_0000040/
        selm_checkpoint.json, hf/, model/      the model (global coordinates: any TP/PP loads it)
        train/optimizer/                       Megatron dist checkpoint of the distributed
                                               optimizer, "fully_reshardable" (any TP/PP/DP)
        train/rng/rank_00000.safetensors       each rank's torch (and Megatron tracker) RNG states
        train/state.json                       step, scheduler, data position, layout (last file)
    OUT/checkpoints/latest                     name of the newest complete checkpoint

Every rank writes into ``.step_0000040.tmp`` first; rank 0 renames the folder into place and only
then updates ``latest``, so a crash leaves either the previous checkpoint or the new one, never a
half-written folder that ``latest`` names. ``keep`` prunes older step folders.

Resume at another layout: the model and the optimizer state reshard; the RNG states are
restored only when tp, pp and dp match (dropout-free training does not depend on them).

The distributed optimizer on the no-Apex path (torch AdamW; always on CPU) needs three
measures, taken by ``load_optimizer_state`` (see ../shared/notes/cpu_stack.md):
* ``fully_reshardable`` sharding (the default format cannot change TP/PP);
* Adam state filled in before the sharded state dict is built for loading (Megatron reads the
  step count from it);
* one ``step`` tensor per parameter after loading (Megatron installs one shared tensor, which
  torch's AdamW then increments once per parameter, skewing bias correction).

Loading never unpickles objects a user did not make: json and safetensors here, Megatron's
dist checkpoints through ``selm_mcore.safe_load`` (restricted unpickler for the DCP
``.metadata``, ``torch.load(weights_only=True)`` for tensors and common.pt).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from selm_mcore.parallel import ParallelContext

logger = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "selm-train-state/1"
LATEST_FILE = "latest"
STEP_PREFIX = "step_"
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed by this run (different data, batch or schedule)."""


@dataclass
class TrainState:
    """What ``load_checkpoint`` restores besides tensors: the step and the data position."""

    step: int
    data: dict[str, int]
    scheduler: dict[str, Any]
    extra: dict[str, Any]


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (named by ``root/latest``), or None."""
    root = Path(root)
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    path = root / latest.read_text().strip()
    if not (path / "train" / "state.json").is_file():
        raise ResumeError(f"{latest} names {path}, which is not a complete checkpoint (no "
                          "train/state.json); delete the folder and the `latest` file to "
                          "restart, or point train.output_dir elsewhere")
    return path


# --- optimizer --------------------------------------------------------------------------------


def _model_sharded_state_dict(models: Sequence) -> dict:
    """The model's sharded state dict (unwrapped chunks): the optimizer state is keyed by it."""
    return {f"chunk{i}": model.sharded_state_dict(prefix="") for i, model in enumerate(models)}


def _distributed_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prefill_adam_state(optimizer) -> None:
    """Give every parameter torch AdamW's initial state (as its first step would)."""
    for dist_opt in _distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state.get(param):
                    inner.state[param] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param,
                                                       memory_format=torch.preserve_format),
                    }


def save_optimizer_state(optimizer, models: Sequence, out_dir: str | Path) -> None:
    """Save the distributed optimizer's state (every rank calls this; ``out_dir`` exists)."""
    from megatron.core import dist_checkpointing

    _prefill_adam_state(optimizer)  # a checkpoint before the first step still has a state
    sharded = optimizer.sharded_state_dict(_model_sharded_state_dict(models),
                                           metadata=OPTIMIZER_SHARDING)
    dist_checkpointing.save({"optimizer": sharded}, str(out_dir))


def load_optimizer_state(optimizer, models: Sequence, in_dir: str | Path) -> None:
    """Load a state written by ``save_optimizer_state`` at any TP/PP/DP (see module doc)."""
    # issue 4 item 7: the dist checkpoint is read without unrestricted unpickling.
    from selm_mcore.safe_load import load_dist_checkpoint

    _prefill_adam_state(optimizer)
    sharded = optimizer.sharded_state_dict(_model_sharded_state_dict(models), is_loading=True,
                                           metadata=OPTIMIZER_SHARDING)
    loaded = load_dist_checkpoint({"optimizer": sharded}, in_dir)["optimizer"]
    dist_optimizers = _distributed_optimizers(optimizer)
    states = [loaded] if len(dist_optimizers) == 1 else [loaded[i] for i in sorted(loaded)]
    for dist_opt, state in zip(dist_optimizers, states):
        param_state = state.pop("param_state")
        sharding = state.pop("param_state_sharding_type")
        if sharding != OPTIMIZER_SHARDING["distrib_optim_sharding_type"]:
            raise ResumeError(f"{in_dir}: optimizer state has sharding {sharding!r}, expected "
                              f"{OPTIMIZER_SHARDING['distrib_optim_sharding_type']!r}")
        # Param groups, step count and grad scaler first (this installs one shared step tensor).
        dist_opt.load_state_dict(state)
        inner_state = dist_opt.optimizer.state
        # The exp_avg/exp_avg_sq/param copy walks each state's keys; "step" is not in the file.
        steps = {param: s.pop("step") for param, s in inner_state.items()}
        dist_opt.load_parameter_state_from_fully_reshardable(param_state)
        for param, s in inner_state.items():
            s["step"] = steps[param].detach().clone()


# --- RNG --------------------------------------------------------------------------------------


def _rng_tensors() -> dict[str, torch.Tensor]:
    from megatron.core import tensor_parallel

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{name}"] = state
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _set_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    tracker_states = {k.split("/", 1)[1]: v for k, v in tensors.items()
                      if k.startswith("tracker/")}
    if tracker_states:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)


def _layout(ctx: ParallelContext) -> dict[str, Any]:
    return {"world_size": ctx.world_size, "tp": ctx.tp, "pp": ctx.pp, "vpp": ctx.vpp,
            "dp": ctx.dp}


# --- save / load ------------------------------------------------------------------------------


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` (rank 0 only)."""
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model_atomic(models: Sequence, ctx: ParallelContext, out_dir: str | Path, *,
                      hf_config, tokenizer_dir: str | Path | None) -> Path:
    """Save a model-only checkpoint folder via a temp folder renamed into place."""
    from selm_mcore.weights import save_model_checkpoint

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ctx)
    save_model_checkpoint(models, ctx, tmp, hf_config, tokenizer_dir)
    _barrier(ctx)
    if ctx.rank == 0:
        _replace_dir(tmp, out_dir)
    _barrier(ctx)
    return out_dir


def save_checkpoint(root: str | Path, step: int, *, models: Sequence, optimizer, scheduler,
                    data_state: dict[str, int], ctx: ParallelContext, hf_config,
                    tokenizer_dir: str | Path | None, keep: int = 0,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (every rank calls this).

    ``models`` are the unwrapped GPTModel chunks; ``extra`` (JSON) is stored in state.json.
    """
    from safetensors.torch import save_file

    from selm_mcore.weights import save_model_checkpoint

    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "train" / "optimizer").mkdir(parents=True)
        (tmp / "train" / "rng").mkdir()
    _barrier(ctx)
    save_model_checkpoint(models, ctx, tmp, hf_config, tokenizer_dir)
    save_optimizer_state(optimizer, models, tmp / "train" / "optimizer")
    save_file(_rng_tensors(), str(tmp / "train" / "rng" / f"rank_{ctx.rank:05d}.safetensors"))
    _barrier(ctx)
    if ctx.rank == 0:
        state = {"format": TRAIN_STATE_FORMAT, "step": step, "data": data_state,
                 "scheduler": scheduler.state_dict(), "layout": _layout(ctx),
                 "extra": extra or {}}
        (tmp / "train" / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        _replace_dir(tmp, final)
        _write_text_atomic(root / LATEST_FILE, final.name + "\n")
        if keep > 0:
            older = sorted(p for p in root.glob(f"{STEP_PREFIX}*") if p.is_dir()
                           and p.name != final.name and p.name < final.name)
            for path in older[:max(0, len(older) - (keep - 1))]:
                shutil.rmtree(path, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    _barrier(ctx)
    return final


def read_train_state(path: str | Path) -> TrainState:
    """The JSON part of a checkpoint (step, data position, scheduler, extra)."""
    state_path = Path(path) / "train" / "state.json"
    state = json.loads(state_path.read_text())
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ResumeError(f"{state_path} has format {state.get('format')!r}, this version reads "
                          f"{TRAIN_STATE_FORMAT!r}")
    return TrainState(step=int(state["step"]), data=state["data"], scheduler=state["scheduler"],
                      extra={**state.get("extra", {}), "layout": state.get("layout", {})})


def load_training_state(path: str | Path, *, models: Sequence, optimizer, scheduler,
                        ctx: ParallelContext) -> TrainState:
    """Restore optimizer, scheduler and (same layout only) RNG from checkpoint ``path``.

    The model weights come from the same folder through ``build_model_from_checkpoint`` (before
    the optimizer is built); returns the step and data position to continue from.
    """
    from safetensors.torch import load_file

    path = Path(path)
    state = read_train_state(path)
    _check_scheduler(path, state.scheduler, scheduler.state_dict())
    load_optimizer_state(optimizer, models, path / "train" / "optimizer")
    scheduler.load_state_dict(state.scheduler)
    saved_layout = state.extra.get("layout", {})
    rng_file = path / "train" / "rng" / f"rank_{ctx.rank:05d}.safetensors"
    if saved_layout == _layout(ctx) and rng_file.is_file():
        _set_rng_tensors(load_file(str(rng_file)))
    else:
        logger.warning("checkpoint %s was saved at layout %s, this run is %s: RNG states are not "
                       "restored (training without dropout does not depend on them)", path,
                       saved_layout, _layout(ctx))
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def _check_scheduler(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose learning-rate schedule differs from the checkpoint's."""
    keys = {"max_lr": "optim.lr (or lr_per_round)", "min_lr": "optim.min_lr",
            "lr_warmup_steps": "optim.warmup_ratio", "lr_decay_steps": "the number of steps",
            "lr_decay_style": "optim.schedule"}
    changed = [f"{name} ({key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r})"
               for key, name in keys.items() if saved.get(key) != current.get(key)]
    if changed:
        raise ResumeError(f"cannot resume from {path}: the learning-rate schedule differs in "
                          f"{'; '.join(changed)}. Resume with the checkpoint's config, or set "
                          "train.resume=false / another train.output_dir to start over")
