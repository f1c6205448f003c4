"""vLLM engine processes: data-parallel slices on one node and across nodes.

    bounds = split_contiguous(num_prompts, num_engines)            # one node, every engine
    bounds = node_slices(num_prompts, num_engines, num_nodes, rank)  # this node's share
    rows = run_engines(model_dir, prompt_rows, gen_cfg, trust_remote_code, workdir, bounds)
    merge_node_outputs(prompt_ids, out_path, num_nodes)              # after every node is done

Each slice is one ``selm _worker engine SPEC`` process (``selm_mcore.rollout.generate.worker_main``
reads its ``EngineSpec``) on its own tensor_parallel_size GPUs of this node, or its own CPU
cores (``engine_environments``), seeded with the slice's start so that any split samples what
one engine would. The engines run under the one child-process supervisor
(``selm_mcore.runtime.procs.ChildProcesses``): the first that fails stops the others.
``generation.num_engines`` counts the engines of the whole allocation: across N nodes each node
runs num_engines / N of the slices (``engines_per_node``) and writes ``OUT.node<k>.jsonl``
(``node_output_path``). The two layout rules (a count that splits over the nodes, GPUs enough
for a node's engines) are checked once each, here, both at config time (``check_engine_layout``)
and where the engines start. No vLLM import here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import ConfigError, GenerationConfig
from selm_mcore.runtime.errors import InputError, UserError
from selm_mcore.runtime.files import read_records, write_jsonl_atomic
from selm_mcore.runtime.procs import ChildProcesses, cuda_available
from selm_mcore.runtime.progress import ProgressReporter, remove_node_progress

logger = logging.getLogger(__name__)


class GenerationError(UserError, RuntimeError):
    """vLLM could not start or generate; the round must stop."""


def split_contiguous(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) slices of ``count`` items over at most ``parts`` non-empty parts; the first
    ``count % parts`` slices get one more item."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for k in range(parts):
        end = start + base + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def engines_per_node(num_engines: int, num_nodes: int) -> int:
    """How many of the allocation's ``num_engines`` engines each of ``num_nodes`` nodes runs;
    refuses a count that does not split evenly."""
    if num_engines % num_nodes:
        raise ConfigError(
            f"generation.num_engines={num_engines} counts the engines of the whole allocation "
            f"and must be a multiple of online.nnodes={num_nodes} (e.g. {num_nodes}: one per "
            "node)"
        )
    return num_engines // num_nodes


def check_engine_gpus(
    num_engines: int, engines_on_node: int, tensor_parallel_size: int, gpus: int, where: str
) -> None:
    """Refuse more of the ``num_engines`` engines x tensor_parallel_size GPUs on one node than
    it has GPUs (``where`` says where the GPU count comes from)."""
    if engines_on_node * tensor_parallel_size > gpus:
        raise ConfigError(
            f"generation.num_engines={num_engines} puts {engines_on_node} engine(s) x "
            f"tensor_parallel_size={tensor_parallel_size} GPUs on one node, more than its {gpus} "
            f"GPUs ({where}); lower num_engines"
        )


def check_engine_layout(
    num_engines: int, tensor_parallel_size: int, num_nodes: int, gpus_per_node: int | None
) -> None:
    """At config time: a count that splits over the nodes, and GPUs enough for each node's
    engines (``gpus_per_node``; None on CPU, where engines share the cores)."""
    per_node = engines_per_node(num_engines, num_nodes)
    if gpus_per_node is not None:
        check_engine_gpus(
            num_engines,
            per_node,
            tensor_parallel_size,
            gpus_per_node,
            f"online.nproc_per_node, over online.nnodes={num_nodes}",
        )


def node_slices(
    num_prompts: int, num_engines: int, num_nodes: int = 1, node_rank: int = 0
) -> list[tuple[int, int]]:
    """The [start, end) prompt slices node ``node_rank`` of ``num_nodes`` generates: its
    contiguous share of the ``num_engines`` slices of all prompts (one node: all of them)."""
    per_node = engines_per_node(num_engines, num_nodes)
    if not 0 <= node_rank < num_nodes:
        raise InputError(f"node rank {node_rank} is outside 0..{num_nodes - 1}")
    bounds = split_contiguous(num_prompts, num_engines)
    return bounds[node_rank * per_node : (node_rank + 1) * per_node]


def engine_environments(num_engines: int, gen_cfg: GenerationConfig) -> list[dict[str, str]]:
    """What each of this node's ``num_engines`` engines adds to its environment: its own
    tensor_parallel_size GPUs (refused when the visible ones are too few), or on CPU its own
    cores (unless VLLM_CPU_OMP_THREADS_BIND is set or the cores are fewer than the engines)."""
    if not cuda_available():
        cores = sorted(os.sched_getaffinity(0))
        if "VLLM_CPU_OMP_THREADS_BIND" in os.environ or len(cores) < num_engines:
            return [{} for _ in range(num_engines)]
        per = len(cores) // num_engines
        return [
            {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[k * per : (k + 1) * per]))}
            for k in range(num_engines)
        ]
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    tp = gen_cfg.tensor_parallel_size
    check_engine_gpus(gen_cfg.num_engines, num_engines, tp, len(devices), "visible here")
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(devices[k * tp : (k + 1) * tp])}
        for k in range(num_engines)
    ]


@dataclass(frozen=True)
class EngineSpec:
    """One engine's job, ``selm _worker engine SPEC``: written as JSON by ``run_engines``, read
    by ``selm_mcore.rollout.generate.worker_main``."""

    model_dir: str
    prompts: str  # JSONL of the slice's prompt rows
    out: str  # JSONL the engine writes, one row per prompt
    gen_cfg: GenerationConfig
    trust_remote_code: bool
    seed_offset: int  # the slice's start: seeds as one engine over all prompts
    progress: str = ""  # the file the engine publishes its count of finished prompts to

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EngineSpec:
        return cls(**{**data, "gen_cfg": GenerationConfig(**data["gen_cfg"])})


def node_rank_from_env() -> int:
    """This node's rank under Slurm (SLURM_NODEID) or torchrun-style launchers."""
    for key in ("SLURM_NODEID", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    raise InputError(
        "--num-nodes > 1 needs the node rank: pass --node-rank, or start one "
        "process per node with srun (SLURM_NODEID) or set NODE_RANK"
    )


def node_output_path(out_path: str | os.PathLike, node_rank: int) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.node{node_rank}{out_path.suffix}")


def merge_node_outputs(
    prompt_ids: Sequence[str], out_path: str | os.PathLike, num_nodes: int
) -> list[dict]:
    """Join the nodes' ``OUT.node<k>.jsonl`` into ``out_path`` (atomically, in ``prompt_ids``
    order) and remove them; refuse a missing node file or rows that are not ``prompt_ids`` once
    each."""
    expected = list(prompt_ids)
    parts = [node_output_path(out_path, k) for k in range(num_nodes)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise GenerationError(
            f"generation on {num_nodes} nodes left no output {missing}: the "
            "launcher did not run `selm generate` on every node (check "
            "online.launcher and the phase log)"
        )
    rows = [row for part in parts for row in read_records(part)]
    by_id = {r["prompt_id"]: r for r in rows}  # node 0 also holds the rows of skipped prompts
    if len(by_id) != len(rows) or sorted(by_id) != sorted(expected):
        raise GenerationError(
            f"the node outputs {[str(p) for p in parts]} do not hold the "
            f"{len(expected)} prompts once each"
        )
    rows = [by_id[prompt_id] for prompt_id in expected]
    write_jsonl_atomic(out_path, rows)
    for part in parts:
        part.unlink()
    remove_node_progress(out_path, num_nodes)
    return rows


def run_engines(
    model_dir: str | os.PathLike,
    prompts: Sequence[dict],
    gen_cfg: GenerationConfig,
    trust_remote_code: bool,
    workdir: Path,
    bounds: Sequence[tuple[int, int]] | None = None,
    reporter: ProgressReporter | None = None,
) -> list[dict]:
    """One engine process per contiguous slice (``bounds``, default the num_engines slices of
    all prompts), each on this node's next GPUs; rows of the slices in order. A failed engine
    stops the others and raises with its log tail. ``reporter`` logs the engines' progress
    (each publishes its count to ``engine<k>.progress`` in ``workdir``)."""
    if bounds is None:
        bounds = split_contiguous(len(prompts), gen_cfg.num_engines)
    environments = engine_environments(len(bounds), gen_cfg)
    child_cfg = dataclasses.replace(gen_cfg, num_engines=1)
    specs = []
    reporter = reporter or ProgressReporter("generate", len(prompts), "prompts", enabled=False)
    with ChildProcesses() as children, reporter:
        for engine, (start, end) in enumerate(bounds):
            slice_path = workdir / f"engine{engine}.prompts.jsonl"
            write_jsonl_atomic(slice_path, list(prompts[start:end]))
            spec = EngineSpec(
                str(model_dir),
                str(slice_path),
                str(workdir / f"engine{engine}.out.jsonl"),
                child_cfg,
                trust_remote_code,
                seed_offset=start,
                progress=str(workdir / f"engine{engine}.progress"),
            )
            reporter.add_file(spec.progress)
            children.start_worker(
                "engine", spec.to_json(), workdir, f"engine{engine}", environments[engine]
            )
            specs.append(spec)
        logger.info("started %d vLLM engines on slices %s", len(specs), list(bounds))
        outcome = children.wait(gen_cfg.engine_timeout_s, settle_s=1.0)
    if not outcome.ok:
        child = outcome.failed or outcome.running[0]
        engine = children.children.index(child)
        start, end = bounds[engine]
        reason = (
            f"timed out after generation.engine_timeout_s={gen_cfg.engine_timeout_s}"
            if outcome.timed_out
            else f"exited with {child.returncode}"
        )
        raise GenerationError(
            f"vLLM engine {engine} (prompts {start}..{end - 1}) {reason}; log "
            f"{child.log_path}:\n{child.tail_chars(3000)}"
        )
    merged = []
    for engine, ((start, end), spec) in enumerate(zip(bounds, specs)):
        rows = read_records(spec.out)
        expected = [p["prompt_id"] for p in prompts[start:end]]
        if [r["prompt_id"] for r in rows] != expected:
            raise GenerationError(
                f"engine {engine} output {spec.out} does not match its prompt "
                f"slice {start}..{end - 1}"
            )
        merged.extend(rows)
    return merged
