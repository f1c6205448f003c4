"""The online SELM loop: ``selm run CONFIG`` runs every round, resumably.

    selm run CONFIG [--set a.b=v ...] [--redo PHASE | --fresh] [--list-phases]

One linear list of phases; for round t = 1..T each phase writes one output under
``WORKDIR/round_t/`` (the phase runner, its manifest and resumption rules:
``selm_mcore.loop.runner``).
A round runs, in this order:

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
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config.io import add_config_arguments, config_from_args, save_config
from selm_mcore.config.schema import ConfigError, SelmConfig
from selm_mcore.data.portions import first_round, write_portion
from selm_mcore.data.rows import prompt_conversation
from selm_mcore.loop.reports import write_report
from selm_mcore.loop.runner import (
    FAULT_ENV,
    Manifest,
    OnlineError,
    Phase,
    clear_outputs,
    parse_fault,
    redo_from,
    run_command,
    run_phases,
    selm_command,
    workdir_lock,
)
from selm_mcore.rollout.pairs import EVAL_ID_PREFIX, eval_anchor
from selm_mcore.runtime.files import hash_path, read_records, write_jsonl_atomic

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
        "train.log_interval",
        "train.tensorboard",
        "generation.engine_timeout_s",
        "generation.reload_timeout_s",
        "generation.gpu_memory_utilization",
    }
)


def megatron_command(cfg: SelmConfig, subcommand: str, *args: str) -> list[str]:
    """The command for a Megatron phase: plain when the world is 1 process, else torchrun.

    ``online.launcher`` (e.g. ``srun --ntasks-per-node=1``) is prepended for multi-node runs;
    torchrun then rendezvouses over ``online.rdzv_endpoint``.
    """
    online = cfg.online
    world = online.nproc_per_node * online.nnodes
    if world == 1 and not online.launcher:
        return selm_command(subcommand, *args)
    torchrun = [
        sys.executable,
        "-P",
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={online.nproc_per_node}",
        f"--nnodes={online.nnodes}",
    ]
    if online.nnodes > 1:
        torchrun += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={online.rdzv_endpoint}",
            f"--rdzv-id={online.rdzv_id}",
        ]
    else:
        torchrun += ["--standalone"]
    return [*shlex.split(online.launcher), *torchrun, "-m", "selm_mcore.cli", subcommand, *args]


def generation_nodes(cfg: SelmConfig) -> int:
    """Nodes the generate phase spreads its engines over: every node of a multi-node run
    started through online.launcher, else this one."""
    return cfg.online.nnodes if cfg.online.nnodes > 1 and cfg.online.launcher else 1


def generate_command(
    cfg: SelmConfig, config: Path, prompts: Path, out: Path, model_dir: Path
) -> list[str]:
    """``selm generate`` on this node, or once per node through online.launcher (each node runs
    its share of generation.num_engines and writes OUT.node<k>.jsonl, merged by the phase)."""
    cmd = selm_command(
        "generate",
        str(config),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model-dir",
        str(model_dir),
    )
    nodes = generation_nodes(cfg)
    if nodes == 1:
        return cmd
    return [*shlex.split(cfg.online.launcher), *cmd, "--num-nodes", str(nodes)]


@dataclass
class RunPaths:
    """Where everything of one run lives (absolute paths)."""

    workdir: Path

    @property
    def manifest(self) -> Path:
        return self.workdir / "manifest.json"

    @property
    def config(self) -> Path:
        return self.workdir / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def round_dir(self, t: int) -> Path:
        return self.workdir / f"round_{t}"

    @property
    def final_dir(self) -> Path:
        return self.workdir / "final"

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.workdir))

    def log(self, phase_name: str) -> Path:
        return self.logs / (phase_name.replace("/", "_") + ".log")


def read_eval_rows(cfg: SelmConfig) -> list[dict[str, Any]]:
    """The held-out rows (the first online.max_eval_prompts), [] without data.eval_prompts_path."""
    if not cfg.data.eval_prompts_path:
        return []
    path = Path(cfg.data.eval_prompts_path)
    if not path.is_file():
        raise FileNotFoundError(f"data.eval_prompts_path={path} does not exist")
    rows = read_records(path)
    if cfg.online.max_eval_prompts:
        rows = rows[: cfg.online.max_eval_prompts]
    for index, row in enumerate(rows):
        if row.get("prompt_id") is None:
            row["prompt_id"] = f"row-{index + 1}"
    return rows


def generation_input(row: dict[str, Any], prompt_id: str) -> dict[str, Any]:
    """A ``selm generate`` input row: the prompt id and the conversation to continue."""
    return {
        "prompt_id": prompt_id,
        "messages": prompt_conversation(row, f"prompt_id {row.get('prompt_id')!r}"),
    }


class RoundPhases:
    """Builds the phase list of a run from its config; each phase is a small method."""

    def __init__(self, cfg: SelmConfig, paths: RunPaths, timeout_s: float | None = None):
        self.cfg = cfg
        self.paths = paths
        self.timeout_s = timeout_s or None
        self.eval_rows = read_eval_rows(cfg)
        if cfg.ranking.kind == "pairrm":
            missing = [r["prompt_id"] for r in self.eval_rows if eval_anchor(r) is None]
            if missing:
                raise OnlineError(
                    f"data.eval_prompts_path={cfg.data.eval_prompts_path}: held-out prompt "
                    f"{missing[0]!r} (and {len(missing) - 1} more) has no 'chosen' conversation; "
                    "PairRM only compares responses, so the held-out score is PairRM's preference "
                    "of the policy's response over that chosen response. Fix: use rows with "
                    "chosen responses (e.g. UltraFeedback test_prefs), or set "
                    "data.eval_prompts_path='' to skip the held-out scores"
                )

    # Policy of round t: what it generates from (HF) and what training starts from.
    def policy_hf(self, t: int) -> Path:
        """HF folder vLLM serves in round t (the first round: model.hf_dir)."""
        if t == first_round(self.cfg):
            return Path(self.cfg.model.hf_dir).absolute()
        return self.paths.round_dir(t) / "policy_hf"

    def policy_start(self, t: int) -> Path:
        """The round's starting policy and frozen reference (the first round: model.hf_dir,
        later: round t-1's Megatron checkpoint)."""
        if t == first_round(self.cfg):
            return Path(self.cfg.model.hf_dir).absolute()
        return self.paths.round_dir(t - 1) / "train" / "final"

    def train_data(self, t: int) -> Path:
        """What round t trains on: the ranked pairs (the warm-up: its portion's original pairs)."""
        round_dir = self.paths.round_dir(t)
        return round_dir / "portion.jsonl" if t == 0 else round_dir / "rank" / "pairs.jsonl"

    def round_overrides(self, t: int) -> dict[str, Any]:
        """Config overrides the Megatron phases of round t share: the learning-rate schedule
        position, and for the warm-up alpha = 0 (plain DPO, as the reference's first round)."""
        overrides: dict[str, Any] = dict(train__round_index=t + 1 - first_round(self.cfg))
        if t == 0:
            overrides["loss__alpha"] = 0
        return overrides

    def _run(self, name: str, cmd: list[str]) -> None:
        run_command(cmd, self.paths.log(name), timeout_s=self.timeout_s)

    def _overrides(self, **values: Any) -> list[str]:
        args = []
        for key, value in values.items():
            args += ["--set", f"{key.replace('__', '.')}={value}"]
        return args

    # --- phases ---
    def portion(self, t: int) -> Phase:
        return Phase(
            f"round{t}/portion",
            self.paths.rel(self.paths.round_dir(t) / "portion.jsonl"),
            lambda partial: write_portion(self.cfg, t, partial),
        )

    def export(self, name: str, checkpoint: Path, out: Path) -> Phase:
        def run(partial: Path) -> None:
            cmd = selm_command(
                "convert",
                "mcore-to-hf",
                "--mcore-dir",
                str(checkpoint),
                "--out-dir",
                str(partial),
                "--tp",
                str(self.cfg.online.export_tp),
            )
            self._run(name, cmd)

        return Phase(name, self.paths.rel(out), run)

    def generate(self, name: str, policy_hf: Path, out: Path, rows_path: Path | None) -> Phase:
        def run(partial: Path) -> None:
            partial.mkdir()
            rows = read_records(rows_path) if rows_path is not None else []
            inputs = [generation_input(r, str(r["prompt_id"])) for r in rows]
            inputs += [
                generation_input(r, EVAL_ID_PREFIX + str(r["prompt_id"])) for r in self.eval_rows
            ]
            write_jsonl_atomic(partial / "prompts.jsonl", inputs)
            write_jsonl_atomic(partial / "eval_rows.jsonl", self.eval_rows)
            out = partial / "generations.jsonl"
            self._run(
                name,
                generate_command(
                    self.cfg, self.paths.config, partial / "prompts.jsonl", out, policy_hf
                ),
            )
            if generation_nodes(self.cfg) > 1:
                from selm_mcore.rollout.engines import merge_node_outputs

                merge_node_outputs(
                    [row["prompt_id"] for row in inputs], out, generation_nodes(self.cfg)
                )

        return Phase(name, self.paths.rel(out), run)

    def rank(self, name: str, generate_dir: Path, out: Path, rows_path: Path | None) -> Phase:
        def run(partial: Path) -> None:
            # One ranker load serves both jobs: the new pairs and the held-out scores.
            partial.mkdir()
            cmd = selm_command(
                "rank",
                str(self.paths.config),
                "--generations",
                str(generate_dir / "generations.jsonl"),
            )
            if rows_path is not None:
                cmd += [
                    "--rows",
                    str(rows_path),
                    "--out",
                    str(partial / "pairs.jsonl"),
                    "--stats",
                    str(partial / "stats.jsonl"),
                ]
            if self.eval_rows:
                cmd += [
                    "--eval-rows",
                    str(generate_dir / "eval_rows.jsonl"),
                    "--eval-out",
                    str(partial / "eval_scores.jsonl"),
                ]
            self._run(name, cmd)

        return Phase(name, self.paths.rel(out), run)

    def refpass(self, t: int) -> Phase:
        name = f"round{t}/refpass"
        round_dir = self.paths.round_dir(t)

        def run(partial: Path) -> None:
            partial.mkdir()
            cmd = megatron_command(
                self.cfg,
                "refpass",
                str(self.paths.config),
                *self._overrides(
                    train__init_from=self.policy_start(t),
                    data__train_path=self.train_data(t),
                    train__ref_cache=partial / "ref_logps.safetensors",
                    train__output_dir=partial,
                    **self.round_overrides(t),
                ),
            )
            self._run(name, cmd)

        return Phase(name, self.paths.rel(round_dir / "refpass"), run)

    def train(self, t: int) -> Phase:
        name = f"round{t}/train"
        round_dir = self.paths.round_dir(t)

        def run(partial: Path) -> None:
            partial.mkdir(exist_ok=True)
            overrides = dict(
                train__init_from=self.policy_start(t),
                data__train_path=self.train_data(t),
                train__output_dir=partial,
                **self.round_overrides(t),
            )
            if self.cfg.train.reference_mode == "precomputed":
                overrides["train__ref_cache"] = round_dir / "refpass" / "ref_logps.safetensors"
            self._run(
                name,
                megatron_command(
                    self.cfg, "train", str(self.paths.config), *self._overrides(**overrides)
                ),
            )
            # The optimizer is fresh every round: step checkpoints (model + optimizer state,
            # terabytes at 70B) are only good for resuming this phase, which is now done.
            if (partial / "checkpoints").exists():
                shutil.rmtree(partial / "checkpoints")

        return Phase(name, self.paths.rel(round_dir / "train"), run, resumable=True)

    def report(
        self,
        name: str,
        round_index: int,
        generator: str,
        rank_dir: Path,
        train_dir: Path | None,
        out: Path,
        history_dirs: list[Path],
        manifest: Manifest,
        warmup: bool = False,
    ) -> Phase:
        def run(partial: Path) -> None:
            write_report(
                partial,
                round_index=round_index,
                generator=generator,
                rank_dir=rank_dir,
                train_dir=train_dir,
                history_dirs=history_dirs,
                phase_seconds=_round_seconds(manifest, name.split("/")[0]),
                warmup=warmup,
            )

        return Phase(name, self.paths.rel(out), run)

    def warmup_round(self, manifest: Manifest) -> list[Phase]:
        """Round 0, the offline DPO warm-up: its portion's original pairs, alpha = 0, from
        model.hf_dir; held-out scores of the start model when there are held-out prompts."""
        round_dir = self.paths.round_dir(0)
        phases = [self.portion(0)]
        if self.eval_rows:
            phases.append(
                self.generate("round0/generate", self.policy_hf(0), round_dir / "generate", None)
            )
            phases.append(
                self.rank("round0/rank", round_dir / "generate", round_dir / "rank", None)
            )
        if self.cfg.train.reference_mode == "precomputed":
            phases.append(self.refpass(0))
        phases.append(self.train(0))
        phases.append(
            self.report(
                "round0/report",
                0,
                "start",
                round_dir / "rank",
                round_dir / "train",
                round_dir / "report",
                [],
                manifest,
                warmup=True,
            )
        )
        return phases

    def selm_round(self, t: int, manifest: Manifest, reports: list[Path]) -> list[Phase]:
        """SELM round t: generate -> rank -> reference pass -> train (-> report); the export of
        the previous round's policy for vLLM opens every round but the first."""
        round_dir = self.paths.round_dir(t)
        portion = round_dir / "portion.jsonl"
        phases = [self.portion(t)]
        if t > first_round(self.cfg):
            phases.append(self.export(f"round{t}/export", self.policy_start(t), self.policy_hf(t)))
        phases.append(
            self.generate(f"round{t}/generate", self.policy_hf(t), round_dir / "generate", portion)
        )
        phases.append(
            self.rank(f"round{t}/rank", round_dir / "generate", round_dir / "rank", portion)
        )
        if self.cfg.train.reference_mode == "precomputed":
            phases.append(self.refpass(t))
        phases.append(self.train(t))
        generator = "start" if t == first_round(self.cfg) else f"round {t - 1} policy"
        phases.append(
            self.report(
                f"round{t}/report",
                t,
                generator,
                round_dir / "rank",
                round_dir / "train",
                round_dir / "report",
                list(reports),
                manifest,
            )
        )
        return phases

    def build(self, manifest: Manifest) -> list[Phase]:
        """Every phase of the run, in order."""
        phases: list[Phase] = []
        reports: list[Path] = []
        rounds = self.cfg.online.rounds
        if self.cfg.online.warmup_dpo_round:
            phases += self.warmup_round(manifest)
            reports.append(self.paths.round_dir(0) / "report")
        for t in range(1, rounds + 1):
            phases += self.selm_round(t, manifest, reports)
            reports.append(self.paths.round_dir(t) / "report")
        if self.cfg.online.final_eval and self.eval_rows:
            final = self.paths.final_dir
            last_policy = self.paths.round_dir(rounds) / "train" / "final"
            phases.append(self.export("final/export", last_policy, final / "policy_hf"))
            phases.append(
                self.generate("final/generate", final / "policy_hf", final / "generate", None)
            )
            phases.append(self.rank("final/rank", final / "generate", final / "rank", None))
            phases.append(
                self.report(
                    "final/report",
                    0,
                    f"round {rounds} policy",
                    final / "rank",
                    None,
                    final / "report",
                    list(reports),
                    manifest,
                )
            )
        return phases


def _round_seconds(manifest: Manifest, prefix: str) -> dict[str, float]:
    return {
        name.split("/", 1)[1]: record["seconds"]
        for name, record in manifest.phases.items()
        if name.startswith(prefix + "/")
    }


# --- selm run ----------------------------------------------------------------------------------


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
    processes, the optional packages the phases import, and the start model and data files."""
    from selm_mcore.rollout.engines import check_engine_layout, cuda_available
    from selm_mcore.runtime.deps import check_dependencies

    cfg.validate(world_size=cfg.online.nproc_per_node * cfg.online.nnodes)
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
