"""``selm bench host-syncs``: host synchronisations per training step, counted on CUDA.

    selm bench host-syncs --json syncs.json          # one GPU; on CPU: a "needs CUDA" line

Trains a tiny random Llama (packed ``shared_prompt`` micro-batches, reference log-probs from a
zero cache, Megatron DDP + the distributed optimizer) through the trainer's own step
(``selm_mcore.train.step.train_step``, built by ``build_training`` as ``selm bench plan-check``
does) with ``torch.cuda.set_sync_debug_mode("warn")``: every operation that makes the host wait
for the GPU warns, and the warnings are counted per step, split into those inside the
micro-batches' forward and backward (Megatron's schedule: there should be none) and the rest of
the step (the step's metrics, the finiteness check, the optimizer's gradient norm), with the
source lines that caused them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from selm_mcore.bench.common import format_table
from selm_mcore.runtime.outputs import temp_folder

SKIP_LINE = "host-syncs: needs CUDA (torch.cuda.is_available() is False); skipped"


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="counted steps")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps before counting")
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--response-tokens", type=int, default=40)
    parser.add_argument("--top", type=int, default=8, help="source lines to list")


class SyncCounter:
    """Counts the synchronisation warnings of ``torch.cuda.set_sync_debug_mode("warn")`` by
    phase (``phase``) and source line, while active (a context manager)."""

    def __init__(self) -> None:
        self.phase = "step"
        self.by_phase: Counter[str] = Counter()
        self.by_source: Counter[str] = Counter()
        self._stack = contextlib.ExitStack()

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            self.by_phase[self.phase] += 1
            self.by_source[f"{filename}:{lineno}"] += 1

    def __enter__(self) -> SyncCounter:
        import torch

        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        self._stack.callback(torch.cuda.set_sync_debug_mode, "default")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@contextlib.contextmanager
def counting_schedule(counter: SyncCounter):
    """Attribute the syncs inside the schedule (every micro-batch's forward and backward) to
    the phase ``micro-batches``."""
    from selm_mcore.train import step as step_module

    run = step_module.run_micro_batches

    def phased(*args, **kwargs):
        counter.phase = "micro-batches"
        try:
            return run(*args, **kwargs)
        finally:
            counter.phase = "step"

    step_module.run_micro_batches = phased
    try:
        yield
    finally:
        step_module.run_micro_batches = run


def _training(args, workdir: Path):
    """(the trainer's ``Training`` on a tiny random Llama, its config)."""
    from selm_mcore.bench.plan_check import _hf_config, _round_data
    from selm_mcore.config.io import load_config
    from selm_mcore.mcore.checkpoint import DTYPES
    from selm_mcore.mcore.model import build_model
    from selm_mcore.mcore.parallel import init_parallel_from
    from selm_mcore.train.build import build_training

    cfg = load_config(
        args.config,
        [
            "model.dtype=bf16",
            "data.packing=shared_prompt",
            "train.global_batch_size=8",
            "data.pack_tokens=512",  # 4 pairs of the default size per micro-batch
            *args.overrides,
            "train.resume=false",
            "train.save_interval=0",
            "train.tensorboard=false",
            f"train.output_dir={workdir}",
        ],
    )
    hf_config, _ = _hf_config(SimpleNamespace(hf_dir="", shape="", layers=0))
    data = _round_data(cfg, args, hf_config.vocab_size, workdir)
    ctx = init_parallel_from(cfg.parallel)
    models = build_model(hf_config, ctx, params_dtype=DTYPES[cfg.model.dtype], packed=data.packed)
    return build_training(cfg, ctx, data, policy=(models, hf_config)), cfg


def run_host_syncs(args) -> dict[str, Any]:
    """The mode's entry (module docstring)."""
    import torch

    if not torch.cuda.is_available():
        print(SKIP_LINE)
        return {"mode": "host-syncs", "skipped": "needs CUDA"}
    from selm_mcore.mcore.parallel import destroy_parallel
    from selm_mcore.train.step import step_micro_batches, train_step

    torch.set_num_threads(args.threads)
    with temp_folder("selm-host-syncs-") as workdir:
        run, cfg = _training(args, Path(workdir))
        try:
            batches = run.sampler.batches()
            for _ in range(args.warmup_steps):
                train_step(run, next(batches))
            torch.cuda.synchronize()
            indices = [next(batches) for _ in range(args.steps)]
            micro_batches = sum(len(step_micro_batches(run, i)) for i in indices)
            with SyncCounter() as counter, counting_schedule(counter):
                for step_indices in indices:
                    train_step(run, step_indices)
        finally:
            destroy_parallel()
    steps = args.steps
    rows = [
        {
            "part": part,
            "syncs": counter.by_phase[part],
            "per_step": counter.by_phase[part] / steps,
            "per_micro_batch": counter.by_phase[part] / micro_batches,
        }
        for part in ("micro-batches", "step")
    ]
    sources = [{"source": s, "syncs": n} for s, n in counter.by_source.most_common(args.top)]
    result = {
        "mode": "host-syncs",
        "device": torch.cuda.get_device_name(),
        "steps": steps,
        "micro_batches": micro_batches,
        "dtype": cfg.model.dtype,
        "packing": cfg.data.packing,
        "rows": rows,
        "sources": sources,
    }
    print(
        f"host syncs (torch.cuda.set_sync_debug_mode), {result['device']}: {steps} training "
        f"steps of a tiny Llama, {micro_batches} packed micro-batches, {cfg.model.dtype}"
    )
    columns = (
        ("part", "part", ""),
        ("syncs", "syncs", ""),
        ("per_step", "per step", ".2f"),
        ("per_micro_batch", "per micro-batch", ".2f"),
    )
    print(format_table(rows, columns))
    if sources:
        print(format_table(sources, (("source", "source line", ""), ("syncs", "syncs", ""))))
    return result
