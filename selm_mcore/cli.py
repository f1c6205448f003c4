"""The ``selm`` command line: one entry point, one subcommand per job.

    selm run CONFIG [--set a.b=v ...]          the online SELM loop (all rounds, resumable)
    selm refpass CONFIG [--set ...]            offline reference log-probs for one round's data
    selm train CONFIG [--set ...]              train one round (under torchrun for TP/PP/DP)
    selm eval CONFIG --model HF_DIR --benchmark alpaca_eval|mt_bench --out DIR
    selm config keys [SECTION]                 every config key with type, default and doc
    selm generate / selm rank / selm convert / selm bench / selm plan   (``selm <cmd> --help``)

Each subcommand lives in the module that does the work: the module defines
``add_arguments(parser)`` and ``main(args)``; this file only wires them up, importing a module
when its subcommand runs (Megatron and vLLM imports cost seconds).

Child processes the commands start for themselves (a data-parallel vLLM engine, a conversion
rank) enter through one hidden command, ``selm _worker KIND SPEC.json``: the module of KIND
(``WORKERS``) runs ``worker_main(spec)`` on the JSON object in SPEC.json.

Errors, the same for every command (``report_errors``): a user error (a
``selm_mcore.runtime.errors.UserError``: a bad config, data row, checkpoint or layout, a plan
that does not fit; or a missing input file, a full disk) prints one line,
``selm CMD: error: MESSAGE`` (plus the module's ``ERROR_HINT``, if it has one), and exits with
status 1; a bug raises, so Python prints its traceback. Under torchrun only rank 0 prints
a user error, except errors one rank can meet alone (its own files and disk), which every rank
that meets them prints. Ctrl-C exits with status 130.

A process started by torchrun or by one of our launchers dies with that launcher
(``selm_mcore.runtime.procs.bind_to_launcher``); every command's process freezes its heap at
exit, for a shorter shutdown (``freeze_heap_at_exit``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from selm_mcore.runtime.errors import is_rank_local, user_message
from selm_mcore.runtime.procs import bind_to_launcher, freeze_heap_at_exit

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "selm_mcore.loop.online",
        "run the online SELM loop: generate, rank, reference pass, train",
    ),
    "refpass": (
        "selm_mcore.train.refpass",
        "compute one round's reference log-probs (offline pass)",
    ),
    "train": ("selm_mcore.train.trainer", "train one round on precomputed reference log-probs"),
    "generate": ("selm_mcore.rollout.generate", "generate responses with vLLM"),
    "rank": (
        "selm_mcore.rollout.pairs",
        "rank candidates: new preference pairs and held-out scores",
    ),
    "eval": (
        "selm_mcore.eval.cli",
        "answer AlpacaEval / MT-Bench with a policy, judge offline, write the official files",
    ),
    "convert": ("selm_mcore.mcore.convert", "convert HF <-> Megatron checkpoints"),
    "bench": ("selm_mcore.bench", "measure throughput, MFU, memory and phase times"),
    "plan": ("selm_mcore.plan", "per-GPU memory and speed of every parallel layout of a model"),
    "config": ("selm_mcore.config.keys", "list every config key: type, default, what it is"),
}

DESCRIPTION = """\
SELM (Self-Exploring Language Models: iterative online DPO with an optimism term) on
Megatron-Core, with vLLM generation and PairRM ranking."""

EPILOG = """\
examples:
  selm run examples/configs/cpu_demo.yaml --set model.hf_dir=DIR   run (or resume) every round
  selm run CONFIG --list-phases                                     what ran, what is left
  selm eval CONFIG --model HF_DIR --benchmark alpaca_eval --out DIR answer and judge a benchmark
  selm config keys [SECTION]                                        every config key, documented

Any config key can be overridden with --set section.key=value. `selm COMMAND --help` shows a
command's arguments; docs/ holds the architecture, evaluation and GPU notes."""

# `selm _worker KIND SPEC`: KIND -> the module whose worker_main(spec) runs the child's job.
WORKERS: dict[str, str] = {
    "engine": "selm_mcore.rollout.generate",
    "convert": "selm_mcore.mcore.convert",
    "rank": "selm_mcore.rollout.rank_workers",
}


def setup_logging() -> None:
    """Rank 0 logs at INFO, other ranks only warnings (configured once, here)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Megatron logs every DDP bucket's parameter list at INFO: keep its warnings only.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return run_worker(argv[1:])
    parser = argparse.ArgumentParser(
        prog="selm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints usage / the error for an unknown command
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"selm {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    setup_logging()
    bind_to_launcher()
    freeze_heap_at_exit()
    return report_errors(
        f"selm {name}", lambda: module.main(args), hint=getattr(module, "ERROR_HINT", None)
    )


def run_worker(argv: list[str]) -> int:
    """``selm _worker KIND SPEC.json`` (internal: started by the commands themselves)."""
    if len(argv) != 2 or argv[0] not in WORKERS:
        sys.exit(f"usage: selm _worker {{{','.join(WORKERS)}}} SPEC.json (internal)")
    kind, spec_path = argv
    setup_logging()
    bind_to_launcher()
    freeze_heap_at_exit()

    def work() -> int:
        spec = json.loads(Path(spec_path).read_text())
        return importlib.import_module(WORKERS[kind]).worker_main(spec)

    return report_errors(f"selm _worker {kind}", work)


def report_errors(label: str, work: Callable[[], int | None], hint: str | None = None) -> int:
    """Run ``work``; a user error prints one message and returns 1, a bug raises."""
    try:
        return int(work() or 0)
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or is_rank_local(exc):
            where = f" (rank {rank})" if rank else ""
            lines = [f"{label}{where}: error: {message}"] + ([hint] if hint else [])
            for handler in logging.getLogger().handlers:  # the log first: the error ends it
                handler.flush()
            print("\n".join(lines), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
