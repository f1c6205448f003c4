"""The ``selm`` command line: one entry point, one subcommand per job.

    selm run CONFIG [--set a.b=v ...]          the online SELM loop (all rounds, resumable)
    selm refpass CONFIG [--set ...]            offline reference log-probs for one round's data
    selm train CONFIG [--set ...]              train one round (under torchrun for TP/PP/DP)
    selm generate / selm rank / selm convert / selm bench   (see ``selm <cmd> --help``)

Each subcommand lives in the module that does the work: the module defines
``add_arguments(parser)`` and ``main(args)``; this file only wires them up, importing a module
when its subcommand runs (Megatron and vLLM imports cost seconds).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("selm_mcore.online", "run the online SELM loop: generate, rank, reference pass, train"),
    "refpass": ("selm_mcore.refpass", "compute one round's reference log-probs (offline pass)"),
    "train": ("selm_mcore.trainer", "train one round on precomputed reference log-probs"),
    "generate": ("selm_mcore.generation", "generate responses with vLLM"),
    "rank": ("selm_mcore.ranking", "rank candidates and build new preference pairs"),
    "convert": ("selm_mcore.weights", "convert HF <-> Megatron checkpoints"),
    "bench": ("selm_mcore.bench", "measure throughput, MFU, memory and phase times"),
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
    parser = argparse.ArgumentParser(prog="selm", description=__doc__.splitlines()[0])
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
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
