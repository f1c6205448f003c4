"""The phases of one ``selm run``, round by round: what each runs and where it writes.

``RoundPhases(cfg, paths).build(manifest)`` turns a config into the run's one linear list of
``selm_mcore.loop.runner.Phase`` objects (the order, the outputs under ``WORKDIR/round_t/`` and the
DPO warm-up round 0: ``selm_mcore.loop.online``). Each phase runs a public ``selm`` subcommand in
a child process (``megatron_command`` puts the Megatron phases under torchrun, and
``generate_command`` spreads generation over the nodes of a multi-node run) or, for the portion
and the report, a plain function in this process. What a round publishes (its ``export`` to
``round_t/policy_hf``, its ``eval``, ``final/export`` and the report's additions) is built by
``selm_mcore.loop.round_outputs``.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.ids import prompt_key
from selm_mcore.data.portions import first_round, write_portion
from selm_mcore.data.rows import prompt_conversation
from selm_mcore.data.sources import check_source, read_source_records
from selm_mcore.loop import round_outputs
from selm_mcore.loop.reports import write_report
from selm_mcore.loop.runner import Manifest, OnlineError, Phase, run_command, selm_command
from selm_mcore.rollout.pairs import EVAL_ID_PREFIX, eval_anchor
from selm_mcore.runtime.files import read_records, write_jsonl_atomic


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
    """Nodes the generate and rank phases spread their engines and rankers over: every node of
    a multi-node run started through online.launcher, else this one."""
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


def rank_command(cfg: SelmConfig, cmd: list[str]) -> list[str]:
    """``selm rank`` (``cmd``) on this node, or once per node through online.launcher (each
    node ranks its share with its own ranker processes and writes OUT.node<k>.jsonl, joined
    by the phase)."""
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
    path = cfg.data.eval_prompts_path
    check_source(path, "data.eval_prompts_path")
    rows = read_source_records(path)
    if cfg.online.max_eval_prompts:
        rows = rows[: cfg.online.max_eval_prompts]
    for index, row in enumerate(rows):
        if row.get("prompt_id") is None:
            row["prompt_id"] = f"row-{index + 1}"
        row["prompt_id"] = prompt_key(row["prompt_id"], f"{path} row {index + 1}")
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
        """HF folder vLLM serves in round t: round t-1's exported policy (the first round:
        model.hf_dir)."""
        if t == first_round(self.cfg):
            return Path(self.cfg.model.hf_dir).absolute()
        return self.paths.round_dir(t - 1) / "policy_hf"

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
        env = round_outputs.child_env(self.cfg, self.paths.workdir, name)
        run_command(cmd, self.paths.log(name), env=env, timeout_s=self.timeout_s)

    run_child = _run

    def _overrides(self, **values: Any) -> list[str]:
        args = []
        for key, value in values.items():
            args += ["--set", f"{key.replace('__', '.')}={value}"]
        return args

    # --- phases ---
    def portion(self, t: int) -> Phase:
        def run(partial: Path) -> None:
            write_portion(self.cfg, t, partial)

        return Phase(
            f"round{t}/portion", self.paths.rel(self.paths.round_dir(t) / "portion.jsonl"), run
        )

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
            # One ranker load per ranker process serves both jobs: new pairs, held-out scores.
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
            self._run(name, rank_command(self.cfg, cmd))
            nodes = generation_nodes(self.cfg)
            if nodes == 1:
                return
            # One `selm rank` per node, as generation: the node parts are joined here.
            from selm_mcore.rollout.rank_workers import merge_rank_nodes

            outputs = [partial / "pairs.jsonl", partial / "stats.jsonl"] if rows_path else []
            if self.eval_rows:
                outputs.append(partial / "eval_scores.jsonl")
            merge_rank_nodes(outputs, nodes)
            if rows_path:  # what `selm rank` checks on one node, over every node's pairs
                from selm_mcore.rollout.pairs import check_pairs_left

                check_pairs_left(read_records(partial / "stats.jsonl"), "the generate phase")

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
            # The partial folder is this phase's own, unfinished by definition: a final model
            # a kill left in it (before the phase was published) is replaced, not refused.
            self._run(
                name,
                megatron_command(
                    self.cfg,
                    "train",
                    str(self.paths.config),
                    *self._overrides(**overrides),
                    "--overwrite",
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
        after: int | None = None,
    ) -> Phase:
        """``after``: the round whose benchmarks, model card and W&B point the report adds
        (``round_outputs.after_report``)."""

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
            if after is not None:
                round_outputs.after_report(self, manifest, after, partial)

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
        phases += self.publish(0)
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
                after=0,
            )
        )
        return phases

    def publish(self, t: int) -> list[Phase]:
        """The policy after round t as an HF folder (next round's generator), and its
        benchmarks when online.eval is set."""
        phases = [round_outputs.export_phase(self, t)]
        if self.cfg.online.eval:
            phases.append(round_outputs.eval_phase(self, t))
        return phases

    def selm_round(self, t: int, manifest: Manifest, reports: list[Path]) -> list[Phase]:
        """SELM round t: generate -> rank -> reference pass -> train -> export (-> eval ->
        report); it generates from the previous round's exported policy."""
        round_dir = self.paths.round_dir(t)
        portion = round_dir / "portion.jsonl"
        phases = [self.portion(t)]
        phases.append(
            self.generate(f"round{t}/generate", self.policy_hf(t), round_dir / "generate", portion)
        )
        phases.append(
            self.rank(f"round{t}/rank", round_dir / "generate", round_dir / "rank", portion)
        )
        if self.cfg.train.reference_mode == "precomputed":
            phases.append(self.refpass(t))
        phases.append(self.train(t))
        phases += self.publish(t)
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
                after=t,
            )
        )
        return phases

    def build(self, manifest: Manifest) -> list[Phase]:
        """Every phase of the run, in order."""
        phases: list[Phase] = []
        reports: list[Path] = []
        rounds = self.cfg.online.rounds
        if self.cfg.online.eval:
            phases.append(round_outputs.eval_phase(self, None))
        if self.cfg.online.warmup_dpo_round:
            phases += self.warmup_round(manifest)
            reports.append(self.paths.round_dir(0) / "report")
        for t in range(1, rounds + 1):
            phases += self.selm_round(t, manifest, reports)
            reports.append(self.paths.round_dir(t) / "report")
        phases.append(round_outputs.final_export_phase(self, rounds))
        if self.cfg.online.final_eval and self.eval_rows:
            final = self.paths.final_dir
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
