"""What a resumed ``selm run`` may change: more rounds, another process or engine layout.

    previous = recorded_config(paths.manifest)              # before the manifest takes the new one
    apply_resume_changes(previous, cfg, workdir, phases, manifest)

Every other config key is fixed for the life of a run (``Manifest`` refuses a change); these
are accepted, each under its rule:

* ``LAYOUT_KEYS`` (processes per node, nodes, vLLM engines and their GPUs, tp / pp / vpp): a
  finished phase never depends on them (a round's trained model is saved in global coordinates
  and loads at any layout; generation and ranking outputs are files). The one exception is a
  training phase interrupted mid-round, whose step checkpoints resume at their own tp / pp /
  vpp (any dp): a tp / pp / vpp change is then refused until that round finishes (or is redone).
* ``online.rounds``: raising it adds rounds. The portions are recomputed only for rounds not
  started; a round whose portion phase finished must keep exactly its rows (with equal slices
  the boundaries move with the number of rounds: online.max_prompts_per_round caps each round
  and keeps them), else the change is refused, naming the round. The final phases, which
  described the old last round's policy, are redone after the new rounds. Lowering it is refused
  once a dropped round has started.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import SelmConfig
from selm_mcore.data.portions import portion_records
from selm_mcore.loop.runner import Manifest, OnlineError, Phase, redo_from
from selm_mcore.runtime.files import read_records

logger = logging.getLogger(__name__)

LAYOUT_KEYS = frozenset(
    {
        "online.nproc_per_node",
        "online.nnodes",
        "generation.num_engines",
        "generation.tensor_parallel_size",
        "parallel.tp",
        "parallel.pp",
        "parallel.vpp",
    }
)
ROUND_KEYS = frozenset({"online.rounds"})
CHECKPOINT_LAYOUT_KEYS = ("parallel.tp", "parallel.pp", "parallel.vpp")


def recorded_config(manifest_path: Path) -> dict[str, Any] | None:
    """The config a run's manifest recorded (None for a new run or an unreadable manifest,
    which ``Manifest`` itself reports)."""
    try:
        recorded = json.loads(Path(manifest_path).read_text())
    except (OSError, ValueError):
        return None
    return recorded.get("config") if isinstance(recorded, dict) else None


def _value(config: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    return (config.get(section) or {}).get(key)


def apply_resume_changes(
    previous: dict[str, Any] | None,
    cfg: SelmConfig,
    workdir: Path,
    phases: list[Phase],
    manifest: Manifest,
) -> None:
    """Check the accepted changes against the run's state (module docstring); redo the final
    phases after a rise of online.rounds. Raises OnlineError for a refused change."""
    if previous is None:
        return
    new = cfg.to_dict()
    changed = [k for k in sorted(LAYOUT_KEYS | ROUND_KEYS) if _value(previous, k) != _value(new, k)]
    if not changed:
        return
    logger.info(
        "resuming with %s",
        ", ".join(f"{k} {_value(previous, k)!r} -> {_value(new, k)!r}" for k in changed),
    )
    moved = [k for k in CHECKPOINT_LAYOUT_KEYS if k in changed]
    if moved:
        _refuse_layout_mid_round(moved, workdir, phases, manifest)
    if "online.rounds" in changed:
        _check_rounds(int(_value(previous, "online.rounds")), cfg, workdir, phases, manifest)


def _refuse_layout_mid_round(
    moved: list[str], workdir: Path, phases: list[Phase], manifest: Manifest
) -> None:
    for phase in phases:
        partial = workdir / (phase.output + ".partial")
        if phase.resumable and phase.name not in manifest.phases and partial.exists():
            raise OnlineError(
                f"{', '.join(moved)} changed while {phase.name} was interrupted mid-round: its "
                f"step checkpoints ({partial}) resume only at the layout they were saved with. "
                f"Fix: finish the round with the old layout first (change it at a round "
                f"boundary), or rerun with --redo {phase.name} to train the round again"
            )


def _check_rounds(
    old_rounds: int, cfg: SelmConfig, workdir: Path, phases: list[Phase], manifest: Manifest
) -> None:
    new_rounds = cfg.online.rounds
    if new_rounds < old_rounds:
        started = [
            name
            for name in manifest.phases
            if name.startswith("round") and int(name[5:].split("/")[0]) > new_rounds
        ]
        if started:
            raise OnlineError(
                f"online.rounds {old_rounds} -> {new_rounds}: round(s) after {new_rounds} "
                f"already ran ({', '.join(started[:4])}); lowering the rounds would leave them "
                "behind the final policy. Fix: keep online.rounds, or start a new online.workdir"
            )
    for name in manifest.phases:
        if not (name.startswith("round") and name.endswith("/portion")):
            continue
        t = int(name[5:].split("/")[0])
        path = workdir / manifest.phases[name]["output"]
        recorded = read_records(path)
        now = json.loads(json.dumps(portion_records(cfg, t)))
        if recorded != now:
            raise OnlineError(
                f"online.rounds {old_rounds} -> {new_rounds} changes the data of round {t}, "
                f"which already started ({len(recorded)} rows in {path}; the new split gives "
                f"{len(now)} rows, first {now[0].get('prompt_id') if now else None!r} instead "
                f"of {recorded[0].get('prompt_id') if recorded else None!r}): the portions are "
                "equal slices of data.train_path, so their boundaries move with the number of "
                "rounds. Fix: keep online.rounds, cap each round with online.max_prompts_per_round "
                "so the started rounds keep their rows, or start a new online.workdir"
            )
    finals = [p.name for p in phases if p.name.startswith("final/")]
    if new_rounds > old_rounds and any(n in manifest.phases for n in finals):
        logger.warning(
            "online.rounds %d -> %d: the final phases described round %d's policy; they run "
            "again after round %d",
            old_rounds,
            new_rounds,
            old_rounds,
            new_rounds,
        )
        redo_from(phases, workdir, manifest, finals[0])
