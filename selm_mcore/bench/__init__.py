"""Throughput benchmarks: ``selm bench MODE ...`` prints a table and writes it as JSON (--json).

Modes (see ``selm bench MODE --help``; CONFIG is optional: defaults + ``--set`` overrides):

    train CONFIG         our trainer: pairs/s, tokens/s, step time, TFLOP/s, MFU, peak memory
                         (reference precomputed, or ``--ref-mode onthefly``)
    compare-trl CONFIG   ours (the config's data.packing and packing none) vs TRL's
                         DPOTrainer (precompute_ref_log_probs; on-the-fly with --trl-modes):
                         same model, pairs, token ids, batch sizes, dtype, threads, steps
    packing CONFIG       ours with each data.packing on the same pairs (SELM with loss.alpha>0)
    refmode CONFIG       ours, precomputed vs on-the-fly reference
    generation CONFIG    vLLM (selm_mcore.rollout.vllm_engine) vs transformers ``generate`` tokens/s
    logprob-path         training steps with the fused log-prob kernel vs Megatron's
                         cross-entropy path (the logprob part of tools/gpu_check.sh)
    plan-check CONFIG    a shape-only random model through the trainer's step: the layout
                         planner's memory prediction beside the measured tensors and peaks
    attention            packed attention backends (torch varlen, flash-attn, per-sequence SDPA)
                         vs the dense masked reference: max error and time, fwd and fwd+bwd
                         (bf16 on a GPU; a small fp32 run on CPU)
    host-syncs CONFIG    host synchronisations per training step on CUDA
                         (torch.cuda.set_sync_debug_mode); prints a "needs CUDA" line on CPU
    phases WORKDIR       seconds per phase of each round, from an online run's manifest
    checksums HF_DIR     seconds per GB the checksums add to saving and loading checkpoints
    ranker               a PairRM-shaped ranker with random weights: pairs/s per device, MFU
                         (llm-blender's path, or transformers' DebertaV2 without it)
    flops CONFIG         the FLOP formula's numbers and the device peak, nothing run

Pairs: synthetic rows written once per run (``--profile uniform``: the given lengths;
``realistic``: long-tailed lengths shaped like public preference data, ``--length-scale`` to
shrink them; ``selm_mcore.bench.pairs``), with the token ids every side trains on.

Fairness rules: both sides use the same dtype and thread count (set before torch starts its
pools), unmeasured warm-up steps, and the median of several repeats. Side-by-side modes run each
implementation in its own process, one repeat of each in turn (ours, peer, ours, peer, ...), so
a change of machine load hits both sides alike; every result records the load average.

Definitions:

* pairs/s = preference pairs (prompt, chosen, rejected[, y_ref]) trained per second; response
  tokens/s = their response tokens per second (the work every layout must do).
* tokens = non-pad tokens fed to the policy per optimizer step (with data.packing=shared_prompt
  a pair's prompt counts once); computed tokens = the tokens of the padded shapes the model
  runs on, per pair.
* step time = one optimizer step's wall time: collation, reference log-probs (looked up, or
  computed on the fly), forwards, backward, clipping, optimizer update. Ours: the trainer's own
  ``step_time_s``; TRL: the time between consecutive ``on_step_end`` callbacks.
* model FLOPs and MFU: ``selm_mcore.modelspec`` (the formula) and ``selm_mcore.train.metrics``
  (the device peaks), stated with every table.
* peak memory = the process's peak resident set (CPU) or peak allocated memory (CUDA) during
  training (ours: the trainer's per-step record, so the final checkpoint save is excluded).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from selm_mcore.bench.common import BenchError, load_average, workdir_path, write_json
from selm_mcore.config.io import add_config_arguments
from selm_mcore.runtime.outputs import output_locks

# The modes that write into --workdir (``workdir_for``); `phases` only reads its workdir.
WORKDIR_MODES = ("train", "refmode", "compare-trl", "packing", "generation", "checksums")


def _add_common(parser, *, config: bool = True, threads_default: int | None = None) -> None:
    if config:
        add_config_arguments(parser, config_file="optional")
    parser.add_argument(
        "--threads",
        type=int,
        default=threads_default
        or int(os.environ.get("OMP_NUM_THREADS", 0) or len(os.sched_getaffinity(0))),
        help="torch threads of every benchmarked process (default: "
        "$OMP_NUM_THREADS, else all cores)",
    )
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


def _add_steps(parser, *, repeats: int) -> None:
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per repeat")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="optimizer steps before measuring (>= 1)"
    )
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="repeats; the tables show the median"
    )


def _add_pairs(parser) -> None:
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=64,
        help="synthetic pairs: prompt length (chat template included)",
    )
    parser.add_argument(
        "--chosen-tokens",
        type=int,
        default=128,
        help="synthetic pairs: chosen response length (EOS included); also y_ref",
    )
    parser.add_argument(
        "--rejected-tokens",
        type=int,
        default=128,
        help="synthetic pairs: rejected response length (EOS included)",
    )
    parser.add_argument(
        "--profile",
        choices=("uniform", "realistic"),
        default="uniform",
        help="synthetic pair lengths: the three lengths above, or long-tailed "
        "ones like real preference data (selm_mcore/bench/pairs.py)",
    )
    parser.add_argument(
        "--length-scale",
        type=float,
        default=1.0,
        help="realistic profile: multiply every length (e.g. 0.5 on a CPU)",
    )
    parser.add_argument(
        "--workdir",
        default="",
        help="folder for pairs, per-process logs and JSON (default: outputs/bench/MODE in the "
        "current folder)",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=1800, help="limit per benchmarked process"
    )


def _training_mode(modes, name: str, help_text: str):
    """A mode that trains on (synthetic) pairs: config, threads, steps, pair lengths."""
    p = modes.add_parser(name, help=help_text)
    _add_common(p)
    _add_steps(p, repeats=3)
    _add_pairs(p)
    return p


def _add_training_modes(modes) -> None:
    p = _training_mode(modes, "train", "our trainer: pairs/s, tokens/s, MFU, peak memory")
    p.add_argument(
        "--pairs",
        default="",
        help="preference JSONL to train on (default: data.train_path, else synthetic "
        "pairs written to the workdir)",
    )
    p.add_argument(
        "--ref-mode",
        choices=("precomputed", "onthefly"),
        default="precomputed",
        help="reference log-probs from the offline pass, or computed in every step",
    )
    _training_mode(modes, "refmode", "our trainer: precomputed vs on-the-fly reference")
    p = _training_mode(modes, "compare-trl", "ours vs TRL DPOTrainer, same work, side by side")
    p.add_argument(
        "--trl-python",
        default="",
        help="python of a TRL environment (default: built/reused by "
        "selm_mcore/bench/setup_trl_env.sh)",
    )
    p.add_argument(
        "--trl-modes",
        nargs="+",
        choices=("onthefly", "precompute"),
        default=["precompute"],
        help="which TRL configurations to run",
    )
    p = _training_mode(modes, "packing", "ours with each data.packing, side by side")
    p.add_argument(
        "--packings",
        nargs="+",
        choices=("shared_prompt", "pack", "none"),
        default=["shared_prompt", "pack", "none"],
        help="the layouts to compare",
    )


def _add_generation_mode(modes) -> None:
    p = modes.add_parser("generation", help="vLLM vs transformers generate tokens/s")
    _add_common(p)
    p.add_argument("--backend", choices=("both", "vllm", "hf"), default="both")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64, help="synthetic prompt length")
    p.add_argument("--prompts", default="", help="prompt rows (JSONL) instead of synthetic ones")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens (stop at EOS)")
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=0,
        help="transformers generate batch (default: all prompts at once)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="")
    p.add_argument("--timeout-s", type=float, default=1800)


def _add_logprob_path_mode(modes) -> None:
    p = modes.add_parser(
        "logprob-path", help="one training step: fused log-prob kernel vs Megatron CE path"
    )
    _add_common(p, config=False)
    p.add_argument(
        "--hf-dir", default="", help="HF folder whose config to use (default: Llama-3-8B's shape)"
    )
    p.add_argument("--layers", type=int, default=0, help="use this many layers (0 = all)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seq-length", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=2, help="pairs per micro-batch")
    p.add_argument("--global-batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument(
        "--paths", nargs="+", choices=("fused", "megatron-ce"), default=["fused", "megatron-ce"]
    )


def _add_other_modes(modes) -> None:
    from selm_mcore.bench.plan_check import add_arguments as add_plan_check_arguments

    p = modes.add_parser(
        "plan-check",
        help="a shape-only random model through the trainer's "
        "step: the layout planner's memory vs measured",
    )
    _add_common(p)
    add_plan_check_arguments(p)

    p = modes.add_parser("phases", help="time per phase of an online run (from its manifest)")
    p.add_argument("workdir", help="online.workdir of a `selm run`")
    p.add_argument("--json", default="")

    p = modes.add_parser("checksums", help="seconds per GB the checksums add to saves/loads")
    p.add_argument(
        "hf_dir",
        help="HF Llama folder to save and load (e.g. `python -m "
        "selm_mcore.testing.assets smollm2` prints SmolLM2's)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--workdir", default="", help="where the saves go (default outputs/bench/checksums)"
    )
    p.add_argument("--json", default="")

    p = modes.add_parser("flops", help="print the FLOP formula's numbers and the device peak")
    _add_common(p)
    p.add_argument("--seq-length", type=int, default=1024)


def _add_gpu_path_modes(modes) -> None:
    from selm_mcore.bench.attention import add_arguments as add_attention_arguments
    from selm_mcore.bench.host_syncs import add_arguments as add_host_syncs_arguments

    p = modes.add_parser(
        "attention",
        help="packed attention backends vs the dense masked reference: max error and time",
    )
    _add_common(p, config=False)
    add_attention_arguments(p)
    p = modes.add_parser("host-syncs", help="host synchronisations per training step (CUDA)")
    _add_common(p)
    add_host_syncs_arguments(p)


def _add_ranker_mode(modes) -> None:
    from selm_mcore.bench.ranker import add_arguments as add_ranker_arguments

    p = modes.add_parser(
        "ranker", help="PairRM-shaped ranker (random weights): pairs/s per device, MFU, padding"
    )
    _add_common(p, config=False)
    add_ranker_arguments(p)


def add_arguments(parser) -> None:
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    _add_training_modes(modes)
    _add_generation_mode(modes)
    _add_logprob_path_mode(modes)
    _add_gpu_path_modes(modes)
    _add_other_modes(modes)
    _add_ranker_mode(modes)


def _modes() -> dict[str, Callable[[Any], dict[str, Any]]]:
    """Mode name -> its runner (imported when a mode runs: the modes import torch, vLLM...)."""
    from selm_mcore.bench import (
        attention,
        checksums,
        compare,
        generation,
        host_syncs,
        logprob_path,
        phases,
        plan_check,
        ranker,
        train,
    )

    return {
        "train": train.run_train,
        "refmode": compare.run_refmode,
        "compare-trl": compare.run_compare_trl,
        "packing": compare.run_packing,
        "generation": generation.run_generation,
        "logprob-path": logprob_path.run_logprob_path,
        "attention": attention.run_attention,
        "host-syncs": host_syncs.run_host_syncs,
        "phases": phases.run_phases_mode,
        "plan-check": plan_check.run_plan_check,
        "flops": phases.run_flops,
        "checksums": checksums.run_checksums,
        "ranker": ranker.run_ranker_bench,
    }


def main(args) -> int:
    if getattr(args, "warmup_steps", 1) < 1 and args.mode not in ("logprob-path", "plan-check"):
        raise BenchError(
            "--warmup-steps must be >= 1: a measured step starts where the last warm-up step ended"
        )
    # One writer per benchmark folder; the benchmark's own child processes inherit the lock.
    locks = {workdir_path(args, args.mode): "--workdir"} if args.mode in WORKDIR_MODES else {}
    with output_locks(locks, command=f"selm bench {args.mode}"):
        result = _modes()[args.mode](args)
    result["load_average_end"] = load_average()
    write_json(args.json, result)
    return 0
