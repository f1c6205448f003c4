"""vLLM engine processes: data-parallel slices on one node and across nodes.

    bounds = split_contiguous(num_prompts, num_engines)            # one node, every engine
    bounds = node_slices(num_prompts, num_engines, num_nodes, rank)  # this node's share
    rows = run_engines(model_dir, prompt_rows, gen_cfg, trust_remote_code, workdir, bounds)
    merge_node_outputs(prompt_ids, out_path, num_nodes)              # after every node is done

Each slice is one ``selm _worker engine SPEC`` process (``selm_mcore.rollout.generate.worker_main``)
on its own tensor_parallel_size GPUs of this node (``engine_env``), or its own CPU cores, seeded
with the slice's start so that any split samples what one engine would. ``generation.num_engines``
counts the engines of the whole allocation: across N nodes each node runs num_engines / N of the
slices and writes ``OUT.node<k>.jsonl`` (``node_output_path``). No vLLM import here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from selm_mcore.config.schema import GenerationConfig
from selm_mcore.runtime.errors import InputError
from selm_mcore.runtime.files import read_records, write_jsonl_atomic
from selm_mcore.runtime.procs import child_env, die_with_parent_preexec

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """vLLM could not start or generate; the round must stop."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_engine_layout(
    num_engines: int, tensor_parallel_size: int, num_nodes: int, gpus_per_node: int | None
) -> None:
    """Refuse engines that cannot be spread: a count that is not a multiple of the nodes, or
    more engines x tensor_parallel_size per node than the node has GPUs (``gpus_per_node``;
    None on CPU, where engines share the cores)."""
    from selm_mcore.config.schema import ConfigError

    if num_engines % num_nodes:
        raise ConfigError(
            f"generation.num_engines={num_engines} counts the engines of the whole allocation "
            f"and must be a multiple of online.nnodes={num_nodes} (e.g. {num_nodes}: one per "
            "node)"
        )
    per_node = num_engines // num_nodes
    if gpus_per_node is not None and per_node * tensor_parallel_size > gpus_per_node:
        raise ConfigError(
            f"generation.num_engines={num_engines} over {num_nodes} node(s) puts {per_node} "
            f"engine(s) x tensor_parallel_size={tensor_parallel_size} GPUs on each node, more "
            f"than its online.nproc_per_node={gpus_per_node} GPUs; lower num_engines"
        )


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


def engine_env(engine: int, num_engines: int, tp: int, on_cpu: bool) -> dict[str, str]:
    """Environment of data-parallel engine ``engine``: its own GPUs, or its own CPU cores."""
    env = dict(os.environ)
    if on_cpu:
        cores = sorted(os.sched_getaffinity(0))
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and len(cores) >= num_engines:
            per = len(cores) // num_engines
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(
                str(c) for c in cores[engine * per : (engine + 1) * per]
            )
        return env
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    import torch

    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(devices) < num_engines * tp:
        raise InputError(
            f"generation.num_engines={num_engines} x tensor_parallel_size={tp} needs "
            f"{num_engines * tp} GPUs, {len(devices)} visible; lower num_engines"
        )
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[engine * tp : (engine + 1) * tp])
    return env


def node_slices(
    num_prompts: int, num_engines: int, num_nodes: int = 1, node_rank: int = 0
) -> list[tuple[int, int]]:
    """The [start, end) prompt slices node ``node_rank`` of ``num_nodes`` generates: its
    contiguous share of the ``num_engines`` slices of all prompts (one node: all of them)."""
    if num_engines % num_nodes:
        raise ValueError(
            f"generation.num_engines={num_engines} engines over {num_nodes} nodes: "
            "it counts the engines of the whole allocation and must be a multiple "
            "of the node count (online.nnodes)"
        )
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node rank {node_rank} is outside 0..{num_nodes - 1}")
    bounds = split_contiguous(num_prompts, num_engines)
    per_node = num_engines // num_nodes
    return bounds[node_rank * per_node : (node_rank + 1) * per_node]


def node_rank_from_env() -> int:
    """This node's rank under Slurm (SLURM_NODEID) or torchrun-style launchers."""
    for key in ("SLURM_NODEID", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    raise ValueError(
        "--num-nodes > 1 needs the node rank: pass --node-rank, or start one "
        "process per node with srun (SLURM_NODEID) or set NODE_RANK"
    )


def node_output_path(out_path: str | os.PathLike, node_rank: int) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.node{node_rank}{out_path.suffix}")


def merge_node_outputs(
    prompt_ids: Sequence[str], out_path: str | os.PathLike, num_nodes: int
) -> list[dict]:
    """Join the nodes' ``OUT.node<k>.jsonl`` into ``out_path`` (atomically) and remove them;
    refuse a missing node file or rows that are not ``prompt_ids`` in order."""
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
    if [r["prompt_id"] for r in rows] != expected:
        raise GenerationError(
            f"the node outputs {[str(p) for p in parts]} do not hold the "
            f"{len(expected)} prompts in order"
        )
    write_jsonl_atomic(out_path, rows)
    for part in parts:
        part.unlink()
    return rows


def run_engines(
    model_dir,
    prompts: Sequence[dict],
    gen_cfg: GenerationConfig,
    trust_remote_code: bool,
    workdir: Path,
    bounds: Sequence[tuple[int, int]] | None = None,
) -> list[dict]:
    """One engine process per contiguous slice (``bounds``, default the num_engines slices of
    all prompts), each on this node's next GPUs; rows of the slices in order. A failed engine
    stops the others and raises with its log tail."""
    on_cpu = not cuda_available()
    if bounds is None:
        bounds = split_contiguous(len(prompts), gen_cfg.num_engines)
    if not on_cpu:
        engine_env(0, len(bounds), gen_cfg.tensor_parallel_size, on_cpu)  # GPU count
    child_cfg = dataclasses.replace(gen_cfg, num_engines=1)
    procs = []
    try:
        for engine, (start, end) in enumerate(bounds):
            slice_path = workdir / f"engine{engine}.prompts.jsonl"
            write_jsonl_atomic(slice_path, list(prompts[start:end]))
            spec = {
                "model_dir": str(model_dir),
                "prompts": str(slice_path),
                "out": str(workdir / f"engine{engine}.out.jsonl"),
                "gen_cfg": dataclasses.asdict(child_cfg),
                "trust_remote_code": trust_remote_code,
                "seed_offset": start,
            }
            spec_path = workdir / f"engine{engine}.spec.json"
            spec_path.write_text(json.dumps(spec))
            log_path = workdir / f"engine{engine}.log"
            with log_path.open("w") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-P",
                        "-m",
                        "selm_mcore.cli",
                        "_worker",
                        "engine",
                        str(spec_path),
                    ],
                    env=child_env(
                        engine_env(engine, len(bounds), gen_cfg.tensor_parallel_size, on_cpu)
                    ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent_preexec(),
                )
            procs.append((engine, start, end, proc, log_path, Path(spec["out"])))
        logger.info("started %d vLLM engines on slices %s", len(procs), bounds)
        deadline = time.monotonic() + gen_cfg.engine_timeout_s if gen_cfg.engine_timeout_s else None
        for engine, start, end, proc, log_path, _ in procs:
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            if code != 0:
                tail = log_path.read_text(errors="replace")[-3000:]
                reason = (
                    f"timed out after generation.engine_timeout_s={gen_cfg.engine_timeout_s}"
                    if code is None
                    else f"exited with {code}"
                )
                raise GenerationError(
                    f"vLLM engine {engine} (prompts {start}..{end - 1}) {reason}; log "
                    f"{log_path}:\n{tail}"
                )
    finally:
        for *_, proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    merged = []
    for engine, start, end, _, _, out_path in procs:
        rows = read_records(out_path)
        expected = [p["prompt_id"] for p in prompts[start:end]]
        if [r["prompt_id"] for r in rows] != expected:
            raise GenerationError(
                f"engine {engine} output {out_path} does not match its prompt "
                f"slice {start}..{end - 1}"
            )
        merged.extend(rows)
    return merged
