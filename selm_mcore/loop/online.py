"""The online SELM loop: ``selm run CONFIG`` runs every round, resumably.

    selm run CONFIG [--set a.b=v ...] [--redo PHASE | --fresh] [--list-phases]

One linear list of phases (built by ``selm_mcore.loop.rounds``); for round t = 1..T each phase
writes one output under ``WORKDIR/round_t/`` (the phase runner, its manifest and resumption
rules: ``selm_mcore.loop.runner``). This module checks the run's inputs, holds the workdir lock
and runs the list. A round runs, in this order:

    portion   portion t of data.train_path (selm_mcore.data.portions)           portion.jsonl
    export    the policy trained in round t-1 as an HF folder for vLLM       policy_hf/
              (every round but the first: it generates from model.hf_dir)
    generate  greedy y_ref for the portion and the held-out prompts (vLLM)   generate/
    rank      rank [y_ref, y_w, y_l]: best/worst -> new pairs with a
              reference_response column; held-out scores (one ranker load) rank/
    refpass   reference log-probs of chosen / rejected / y_ref               refpass/
    train     one round of SELM training -> Megatron checkpoint train/final  train/
    report    held-out score distribution, implicit rewards, win counts      report/

so the data flows generate -> rank -> reference pass -> train -> export (opening the next
round) -> generate ... Then ``final/export``, ``final/generate``, ``final/rank`` and
``final/report`` score the last policy on the held-out prompts (online.final_eval). The round's
starting policy and frozen reference is round t-1's ``train/final`` (the first round:
model.hf_dir). At the end a table with one row per policy is printed
(``reports.format_round_table``).

With online.warmup_dpo_round (the paper's Zephyr recipe) a round 0 comes first: ``round0/portion``
(the first of rounds + 1 portions: the original chosen/rejected pairs), ``round0/generate`` and
``round0/rank`` (held-out scores of the start model only, when there are held-out prompts),
``round0/refpass``, ``round0/train`` (plain DPO: loss.alpha = 0, learning rate
optim.lr_per_round[0]) and ``round0/report``; round 1 then exports, generates from and starts
from round 0's policy, and round t reads portion t + 1 with optim.lr_per_round[t]. This reads
the reference's Zephyr script (train_zephyr.sh with dpo_config_full.yaml): its first of 4
iterations is TRL's plain DPOTrainer on train_prefs[0 : 61135 // 4] (the original pairs, no
y_ref) from the SFT model, with the SELM rounds' settings but alpha (beta 0.01, lr 5e-7, cosine,
10% warm-up, one epoch, max length 1024 / prompt 512); the SELM iterations then take the next
quarters from its policy (lr 5e-7, 5e-7, 1e-7).

Processes: every phase but portion and report runs a public ``selm`` subcommand in its own
process (``selm generate``, ``selm rank``, ``selm refpass``, ``selm train``, ``selm convert``), so
each has the accelerators to itself; the Megatron phases (refpass, train) run under torchrun
when online.nproc_per_node * online.nnodes > 1 (multi-node: online.launcher, e.g. srun, starts
one torchrun per node). This process never loads a model. Every child's output is shown and
kept in ``WORKDIR/logs/<phase>.log``. The manifest also records content hashes of the inputs
(data files, start model, ranker) and the resolved config; a changed one is refused.

Outputs are deleted only on request: ``--redo PHASE`` deletes PHASE's output and every later
one, ``--fresh`` every output of the run and its manifest; a finished output the manifest does
not record (e.g. the manifest was deleted) stops the run before anything runs.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from selm_mcore.config.io import add_config_arguments, config_from_args, save_config
from selm_mcore.config.schema import ConfigError, SelmConfig
from selm_mcore.loop.rounds import RoundPhases, RunPaths, generation_nodes
from selm_mcore.loop.runner import (
    FAULT_ENV,
    Manifest,
    OnlineError,
    clear_outputs,
    parse_fault,
    redo_from,
    run_phases,
    workdir_lock,
)
from selm_mcore.mcore.families import check_model_config_dir
from selm_mcore.runtime.files import hash_path

logger = logging.getLogger(__name__)

# Config keys a resumed run may change: they do not alter what finished phases produced.
# (Not online.rounds: it changes how the data is split into portions.)
RESUME_MUTABLE_KEYS = frozenset(
    {
        "online.workdir",
        "online.final_eval",
        "online.phase_timeout_s",
        "online.launcher",
        "online.rdzv_endpoint",
        "online.rdzv_id",
        "ranking.device",
        "ranking.batch_size",
        "ranking.num_workers",
        "train.host_memory_gb",
        "train.log_interval",
        "train.tensorboard",
        "generation.engine_timeout_s",
        "generation.reload_timeout_s",
        "generation.gpu_memory_utilization",
    }
)


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--redo",
        metavar="PHASE",
        default=None,
        help="delete the outputs of PHASE (e.g. round2/rank) and every later "
        "phase, then run from PHASE",
    )
    start.add_argument(
        "--fresh",
        action="store_true",
        help="delete every output of this run (online.workdir) and its manifest, then start over",
    )
    parser.add_argument(
        "--list-phases",
        action="store_true",
        help="print the phases and whether each is done, then exit",
    )


def first_readers(cfg: SelmConfig) -> dict[str, str]:
    """{input: the first phase that reads it} (the DPO warm-up round 0 generates and ranks only
    when there are held-out prompts)."""
    if not cfg.online.warmup_dpo_round:
        return {
            "data.train_path": "round1/portion",
            "model.hf_dir": "round1/generate",
            "data.eval_prompts_path": "round1/generate",
            "ranking": "round1/rank",
        }
    first_megatron = (
        "round0/refpass" if cfg.train.reference_mode == "precomputed" else "round0/train"
    )
    held_out = bool(cfg.data.eval_prompts_path)
    return {
        "data.train_path": "round0/portion",
        "model.hf_dir": "round0/generate" if held_out else first_megatron,
        "data.eval_prompts_path": "round0/generate",
        "ranking": "round0/rank" if held_out else "round1/rank",
    }


def input_hashes(cfg: SelmConfig, full_hash_max_bytes: int) -> dict[str, tuple[str, str]]:
    """{input: (content hash, first phase that reads it)} for what a run reads from outside its
    workdir."""
    readers = first_readers(cfg)
    inputs = {
        "data.train_path": (cfg.data.train_path, readers["data.train_path"]),
        "model.hf_dir": (cfg.model.hf_dir, readers["model.hf_dir"]),
        "data.eval_prompts_path": (cfg.data.eval_prompts_path, readers["data.eval_prompts_path"]),
    }
    if cfg.ranking.kind != "verifiable" and Path(cfg.ranking.model_path).exists():
        inputs["ranking.model_path"] = (cfg.ranking.model_path, readers["ranking"])
        if cfg.ranking.backbone:
            inputs["ranking.backbone"] = (cfg.ranking.backbone, readers["ranking"])
    return {
        key: (hash_path(path, full_hash_max_bytes), first)
        for key, (path, first) in inputs.items()
        if path
    }


def collect_summaries(paths: RunPaths, rounds: int):
    from selm_mcore.loop import reports

    dirs = [paths.round_dir(t) / "report" for t in range(0, rounds + 1)]
    dirs.append(paths.final_dir / "report")
    return [reports.read_summary(d) for d in dirs if (d / "summary.json").is_file()]


def check_run_inputs(cfg: SelmConfig) -> None:
    """What would otherwise fail rounds later, in a subprocess: the config for this many
    processes, the device (parallel.device), the optional packages the phases import, and the
    start model and data files."""
    from selm_mcore.rollout.engines import check_engine_layout, cuda_available
    from selm_mcore.runtime.deps import check_dependencies
    from selm_mcore.runtime.device import apply_device_setting

    cfg.validate(world_size=cfg.online.nproc_per_node * cfg.online.nnodes)
    apply_device_setting(cfg.parallel.device)  # CUDA expected but unusable: stop now, loudly
    check_dependencies(cfg)
    check_engine_layout(
        cfg.generation.num_engines,
        cfg.generation.tensor_parallel_size,
        generation_nodes(cfg),
        cfg.online.nproc_per_node if cuda_available() else None,
    )
    if not cfg.model.hf_dir or not Path(cfg.model.hf_dir).is_dir():
        raise ConfigError(
            f"model.hf_dir={cfg.model.hf_dir!r} is not a folder: point it at the "
            "starting policy (an HF model folder)"
        )
    if (Path(cfg.model.hf_dir) / "config.json").is_file():  # else its first phase says why
        check_model_config_dir(
            cfg.model.hf_dir,
            max_length=cfg.data.max_length,
            generation_context=cfg.generation.max_model_len,
        )
    if not cfg.data.train_path or not Path(cfg.data.train_path).is_file():
        raise ConfigError(
            f"data.train_path={cfg.data.train_path!r} is not a file: point it at "
            "the preference rows (JSONL or Parquet)"
        )


def run_online(
    cfg: SelmConfig, *, redo: str | None = None, list_only: bool = False, fresh: bool = False
) -> int:
    """Run (or resume) every phase of ``cfg``; print the per-round table. Returns an exit code.

    ``fresh``: delete the run's manifest and outputs first (``runner.clear_outputs``)."""
    from selm_mcore.loop import reports

    check_run_inputs(cfg)
    paths = RunPaths(Path(cfg.online.workdir).absolute())
    fault = parse_fault(os.environ.get(FAULT_ENV))
    start = time.perf_counter()
    with workdir_lock(paths.workdir):
        fresh = fresh and not list_only
        if fresh and paths.manifest.exists():  # first: it may hold another config
            logger.warning("--fresh: deleting %s", paths.manifest)
            paths.manifest.unlink()
        manifest = Manifest(
            paths.manifest,
            cfg.to_dict(),
            mutable_keys=RESUME_MUTABLE_KEYS,
            defaults=SelmConfig().to_dict(),
        )
        save_config(cfg, paths.config)
        phases = RoundPhases(cfg, paths, cfg.online.phase_timeout_s).build(manifest)
        if fresh:
            clear_outputs(phases, paths.workdir)
        if fault is not None and fault[0] not in {p.name for p in phases}:
            raise OnlineError(f"{FAULT_ENV}={fault[0]!r} names no phase of this run")
        if list_only:
            for phase in phases:
                done = "done" if phase.name in manifest.phases else "todo"
                print(f"{done}  {phase.name:<20} {phase.output}")
            return 0
        if redo:
            dropped = redo_from(phases, paths.workdir, manifest, redo)
            logger.info("--redo %s: forgot %s", redo, ", ".join(dropped) or "nothing")
        manifest.check_inputs(input_hashes(cfg, cfg.online.full_hash_max_mb << 20))
        timings = run_phases(
            phases,
            paths.workdir,
            manifest,
            full_hash_max_bytes=cfg.online.full_hash_max_mb << 20,
            fault=fault,
        )
    print()
    print(
        f"SELM run {paths.workdir}: {cfg.online.rounds} round(s), "
        f"{len(timings)} phase(s) run now in {time.perf_counter() - start:.0f} s"
    )
    print(reports.format_round_table(collect_summaries(paths, cfg.online.rounds)))
    print()
    print("Phase times (s), as recorded when each phase ran:")
    print(
        reports.format_phase_times(
            {name: record["seconds"] for name, record in manifest.phases.items()}
        )
    )
    final_report = paths.final_dir / "report" / "report.md"
    print(
        f"reports: {paths.workdir}/round_*/report/report.md"
        + (f", {final_report}" if final_report.exists() else "")
    )
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds run_command, which kills the running phase


# Printed by the CLI after a user error (selm_mcore.cli.report_errors).
ERROR_HINT = (
    "selm run stopped (exit status 1). Fix the cause and rerun the same command: it "
    "resumes at the first unfinished phase."
)


def main(args) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # e.g. Slurm's time limit
    cfg = config_from_args(args)
    return run_online(cfg, redo=args.redo, list_only=args.list_phases, fresh=args.fresh)
