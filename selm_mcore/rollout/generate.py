"""Generate responses for a file of prompts (SELM step 2): ``selm generate``.

    selm generate CONFIG --prompts P.jsonl --out OUT.jsonl [--model-dir HF_DIR]

``generate_file`` reads prompt rows (JSONL: prompt_id + prompt, or prompt_id + messages) and
writes ``{prompt_id, prompt, responses, finish_reasons, prompt_tokens_cut}`` rows atomically;
the responses are stripped of surrounding whitespace, as the reference code strips them before
ranking and training (``selm_mcore.data.rows.strip_response``). The engine, its rendering,
sampling, keep-the-end prompt truncation and weight reloads: ``selm_mcore.rollout.vllm_engine``
(the only importer of vllm). With ``generation.num_engines > 1`` the prompts are cut into
contiguous slices, one engine process per slice (``selm _worker engine SPEC``: ``worker_main``;
each on its own tensor_parallel_size GPUs, or its own CPU cores), merged in order. Every prompt
gets its own seed (generation.seed + its index in the file), so seeded sampling gives the same
responses whatever the number of engines.

Across nodes (``selm generate ... --num-nodes N``, started once per node by online.launcher):
``generation.num_engines`` counts the engines of the whole allocation, N / nodes per node; every
node runs the engines of its contiguous share of the slices (``node_slices``; the node rank comes
from SLURM_NODEID, NODE_RANK or GROUP_RANK, or ``--node-rank``) and writes
``OUT.node<k>.jsonl``; ``merge_node_outputs`` joins them in prompt order. Slices and per-prompt
seeds are those of one node running all engines, so the output does not depend on N.

Progress: done/total prompts, rate and ETA at least every 30 s, summed over the engines and
nodes, logged by node 0 (``selm_mcore.runtime.progress``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config.io import add_config_arguments, config_from_args
from selm_mcore.config.schema import GenerationConfig
from selm_mcore.data.ids import prompt_key
from selm_mcore.data.rows import prompt_conversation, raw_prompt, strip_response
from selm_mcore.data.special_tokens import (
    SpecialTokenText,
    first_special_text,
    keep_row,
    messages_texts,
)
from selm_mcore.rollout.engines import (
    cuda_available,
    node_output_path,
    node_rank_from_env,
    node_slices,
    run_engines,
)
from selm_mcore.rollout.vllm_engine import (
    Completion,
    VLLMGenerator,
    check_model_dir,
    generation_context,
)
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.files import read_records, verify_checksums, write_jsonl_atomic
from selm_mcore.runtime.outputs import (
    add_overwrite_argument,
    output_locks,
    refuse_finished,
    temp_folder,
)
from selm_mcore.runtime.preflight import check_model_run, check_output_dir
from selm_mcore.runtime.progress import ProgressCounter, ProgressReporter, job_reporter

logger = logging.getLogger(__name__)


# --- prompts ----------------------------------------------------------------------------------


@dataclass
class PromptRow:
    prompt_id: str
    prompt: str  # the raw prompt text (what the ranker sees)
    messages: list[dict]  # the conversation to continue (ends with a user turn)


def prompt_row(row: Mapping[str, Any], where: str) -> PromptRow:
    """A prompt from a row (``selm_mcore.data.rows.prompt_conversation`` says which
    conversation)."""
    prompt_id = prompt_key(row.get("prompt_id"), where)
    messages = prompt_conversation(row, where)
    return PromptRow(prompt_id, raw_prompt(row, messages), messages)


def load_prompts(path: str | os.PathLike) -> list[PromptRow]:
    """Prompt rows of a JSONL file; prompt_ids must be unique (they key the join with ranking)."""
    prompts: list[PromptRow] = []
    seen: dict[str, int] = {}  # prompt_id -> its row
    for index, row in enumerate(read_records(path)):
        prompt = prompt_row(row, f"{path} row {index}")
        if prompt.prompt_id in seen:
            raise InputError(
                f"{path} row {index}: prompt_id {prompt.prompt_id!r} repeats row "
                f"{seen[prompt.prompt_id]}; prompt ids must be unique"
            )
        seen[prompt.prompt_id] = index
        prompts.append(prompt)
    return prompts


def screen_prompts(
    prompts: Sequence[PromptRow], model_dir, rule: str, trust_remote_code: bool, where: str
) -> tuple[list[PromptRow], list[dict], int]:
    """Apply data.special_tokens_in_text to prompts whose messages hold the text of one of the
    model's special tokens (``selm_mcore.data.special_tokens``): (the prompts to generate for,
    the output rows of the prompts left out (rule skip: no responses, ``skipped``), how many
    prompts hold such text). Rule refuse raises naming the prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    specials = SpecialTokenText(tokenizer)
    kept: list[PromptRow] = []
    left_out: list[dict] = []
    concerned = 0
    for index, prompt in enumerate(prompts):
        hit = first_special_text(specials, messages_texts(prompt.messages))
        concerned += hit is not None
        if keep_row(rule, hit, f"{where} row {index + 1} (prompt_id {prompt.prompt_id!r})"):
            kept.append(prompt)
        else:
            left_out.append(
                {
                    "prompt_id": prompt.prompt_id,
                    "prompt": prompt.prompt,
                    "responses": [],
                    "finish_reasons": [],
                    "prompt_tokens_cut": 0,
                    "skipped": "special-token text (data.special_tokens_in_text=skip)",
                }
            )
    return kept, left_out, concerned


def _in_prompt_order(
    prompts: Sequence[PromptRow], generated: Sequence[dict], left_out: Sequence[dict]
) -> list[dict]:
    by_id = {row["prompt_id"]: row for row in (*generated, *left_out)}
    return [by_id[p.prompt_id] for p in prompts]


# --- files (data-parallel and multi-node engines: selm_mcore.rollout.engines) ----------------


def _output_rows(
    prompts: Sequence[PromptRow], completions: Sequence[Sequence[Completion]]
) -> list[dict]:
    return [
        {
            "prompt_id": p.prompt_id,
            "prompt": p.prompt,
            "responses": [strip_response(c.text) for c in row],
            "finish_reasons": [c.finish_reason for c in row],
            "prompt_tokens_cut": max((c.prompt_tokens_cut for c in row), default=0),
        }
        for p, row in zip(prompts, completions)
    ]


def _generate_rows(
    model_dir,
    prompts: Sequence[PromptRow],
    gen_cfg: GenerationConfig,
    trust_remote_code: bool,
    seed_offset: int,
    progress: ProgressCounter | None = None,
) -> list[dict]:
    with VLLMGenerator(model_dir, gen_cfg, trust_remote_code) as generator:
        completions = generator.generate_outputs(
            [p.messages for p in prompts],
            seed_offset=seed_offset,
            labels=[p.prompt_id for p in prompts],
            progress=progress,
        )
    return _output_rows(prompts, completions)


def _generate(
    model_dir,
    prompts: Sequence[PromptRow],
    gen_cfg: GenerationConfig,
    trust_remote_code: bool,
    out_path: str | os.PathLike,
    bounds: list[tuple[int, int]] | None,
    reporter: ProgressReporter,
) -> list[dict]:
    """Output rows of ``prompts`` (this node's ``bounds`` slices when given): one engine in
    this process, or one engine process per slice; no engine for no prompt. ``reporter``
    counts the prompts done."""
    if bounds is not None or (gen_cfg.num_engines > 1 and len(prompts) > 1):
        out_dir = Path(out_path).absolute().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        if bounds == []:
            return []
        with temp_folder(".engines.", out_dir) as workdir:
            return run_engines(
                model_dir,
                [dataclasses.asdict(p) for p in prompts],
                gen_cfg,
                trust_remote_code,
                workdir,
                bounds,
                reporter=reporter,
            )
    if not prompts:
        return []
    counter = ProgressCounter()
    reporter.add_source(counter)
    with reporter:
        return _generate_rows(
            model_dir, prompts, gen_cfg, trust_remote_code, seed_offset=0, progress=counter
        )


def generate_file(
    model_dir: str | os.PathLike,
    prompts_path: str | os.PathLike,
    out_path: str | os.PathLike,
    gen_cfg: GenerationConfig,
    *,
    trust_remote_code: bool = False,
    num_nodes: int = 1,
    node_rank: int = 0,
    special_tokens_in_text: str = "plain",
) -> list[dict]:
    """Generate responses for every prompt row of ``prompts_path`` and write
    ``{prompt_id, prompt, responses, finish_reasons, prompt_tokens_cut}`` JSONL to ``out_path``
    atomically (responses stripped). With ``num_nodes > 1`` only this node's slices, to
    ``node_output_path(out_path, rank)`` (``merge_node_outputs`` joins them). Returns the rows
    written. Prompts holding special-token text follow ``special_tokens_in_text``
    (``screen_prompts``; with skip, the seeds of the prompts kept follow their order)."""
    gen_cfg.validate()
    all_prompts = load_prompts(prompts_path)
    check_model_dir(model_dir, on_cpu=not cuda_available())
    verify_checksums(
        model_dir,
        fix=f"export {model_dir} again (selm convert mcore-to-hf "
        "--overwrite) or point at an intact copy",
    )
    prompts, left_out, special_prompts = screen_prompts(
        all_prompts, model_dir, special_tokens_in_text, trust_remote_code, str(prompts_path)
    )
    start = time.perf_counter()
    reporter = job_reporter(
        "generate",
        len(prompts),
        "prompts",
        out_path=out_path,
        num_nodes=num_nodes,
        node_rank=node_rank,
    )
    if num_nodes > 1:
        bounds = node_slices(len(prompts), gen_cfg.num_engines, num_nodes, node_rank)
        out_path = node_output_path(out_path, node_rank)
    else:
        bounds = None
    rows = _generate(model_dir, prompts, gen_cfg, trust_remote_code, out_path, bounds, reporter)
    if left_out and bounds is None:  # one node: every prompt's row, in file order
        rows = _in_prompt_order(all_prompts, rows, left_out)
    elif left_out:  # this node's slices of the prompts kept; node 0 adds the rows left out
        rows = rows + (left_out if node_rank == 0 else [])
    write_jsonl_atomic(out_path, rows)
    truncated = sum(1 for row in rows if row["prompt_tokens_cut"])
    logger.info(
        "wrote %d prompts x %d responses to %s in %.1f s; %d prompts truncated to the "
        "generation context of %d tokens (kept the end); special-token text "
        "(data.special_tokens_in_text=%s): %d prompts, %d left out",
        len(rows),
        gen_cfg.n,
        out_path,
        time.perf_counter() - start,
        truncated,
        generation_context(gen_cfg),
        special_tokens_in_text,
        special_prompts,
        len(left_out),
    )
    return rows


def worker_main(spec: dict) -> int:
    """One data-parallel engine process (``selm _worker engine SPEC``, started by
    ``selm_mcore.rollout.engines.run_engines``)."""
    from selm_mcore.rollout.engines import EngineSpec
    from selm_mcore.runtime.procs import forked_children_die_with_this_process

    forked_children_die_with_this_process()  # vLLM's forked workers die with this engine
    job = EngineSpec.from_json(spec)
    prompts = [PromptRow(**row) for row in read_records(job.prompts)]
    counter = ProgressCounter(job.progress or None)
    rows = _generate_rows(
        job.model_dir, prompts, job.gen_cfg, job.trust_remote_code, job.seed_offset, counter
    )
    counter.publish()
    write_jsonl_atomic(job.out, rows)
    return 0


# --- CLI: selm generate -----------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--prompts", required=True, help="JSONL prompt rows: prompt_id + prompt (str) or messages"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output JSONL: prompt_id, prompt, responses, finish_reasons, prompt_tokens_cut",
    )
    parser.add_argument(
        "--model-dir", default=None, help="HF folder to serve (default: model.hf_dir of the config)"
    )
    parser.add_argument(
        "--num-nodes",
        type=int,
        default=1,
        help="generate this node's share of generation.num_engines engines over "
        "N nodes (one process per node, e.g. through srun); writes "
        "OUT.node<k>.jsonl",
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this node's rank (default: SLURM_NODEID / NODE_RANK / GROUP_RANK)",
    )
    add_overwrite_argument(parser, "the --out file")


def main(args) -> int:
    from selm_mcore.runtime.device import apply_device_setting

    cfg = config_from_args(args)
    apply_device_setting(cfg.parallel.device)
    model_dir = args.model_dir or cfg.model.hf_dir
    if not model_dir:
        raise InputError("no model to serve: pass --model-dir or set model.hf_dir")
    check_output_dir(Path(args.out).absolute().parent, what="--out")
    check_model_dir(model_dir, on_cpu=not cuda_available())  # an HF folder vLLM can serve
    check_model_run(
        cfg,
        model_dir,
        job="generate",
        dtype="fp32" if cfg.generation.dtype == "float32" else "bf16",  # auto: at least 2 bytes
        processes_on_host=1 if cuda_available() else cfg.generation.num_engines,
    )
    node_rank = 0
    out = Path(args.out)
    if args.num_nodes > 1:
        node_rank = args.node_rank if args.node_rank is not None else node_rank_from_env()
        out = node_output_path(out, node_rank)
    with output_locks({out: "--out"}, command="selm generate"):
        refuse_finished(out, setting="--out", overwrite=args.overwrite, what="generations")
        generate_file(
            model_dir,
            args.prompts,
            args.out,
            cfg.generation,
            trust_remote_code=cfg.model.trust_remote_code,
            num_nodes=args.num_nodes,
            node_rank=node_rank,
            special_tokens_in_text=cfg.data.special_tokens_in_text,
        )
    return 0
