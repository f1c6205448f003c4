"""Ranker processes: every ranker on every local GPU, one ``selm rank`` per node across nodes.

    result = rank_rows(cfg, rows, eval_rows, generations, progress_path=OUT)   # this node
    merge_rank_nodes(paths, num_nodes)                                         # after every node

``ranking.num_workers`` ranker processes per node (0 = one per visible GPU when the ranker runs
on CUDA, else 1). The rows to pair and the held-out rows are cut into contiguous slices of whole
batches (``batch_slices``: ranking.batch_size rows each), node k taking its share of every cut
and each of its workers a share of that; each worker is one ``selm _worker rank SPEC`` process
(``worker_main``) with one GPU of its own (``CUDA_VISIBLE_DEVICES``) or its share of the CPU
cores, loads the ranker once and ranks its rows and held-out rows. The results are joined back in
row order. Cutting at whole batches keeps every batch the ranker sees what one process would see
(llm-blender truncates a batch's candidates by the batch's longest prompt), so any number of
workers and nodes writes what one process writes. One worker ranks in this process.

Across N nodes (``selm rank ... --num-nodes N``, started once per node by online.launcher, as
generation): node k writes ``OUT.node<k>.jsonl`` for each output; ``merge_rank_nodes`` joins
them. Progress (``selm_mcore.runtime.progress``): prompts ranked, over every worker and node,
logged by node 0.

Batches are padded to their longest input, not the maximum: llm-blender's PairRM collator
tokenises to the maximum length but keeps only the columns some row of the batch uses, and
``CrossCompareReranker._forward`` drops the columns no pair uses before the backbone runs
(``tests/e2e/test_rank_workers.py`` checks the backbone's input length).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selm_mcore.config.schema import ConfigError, RankingConfig
from selm_mcore.rollout.engines import node_output_path, split_contiguous
from selm_mcore.rollout.rankers import RankerError, build_ranker
from selm_mcore.runtime.files import read_records, write_jsonl_atomic
from selm_mcore.runtime.outputs import temp_folder
from selm_mcore.runtime.procs import ChildProcesses
from selm_mcore.runtime.progress import (
    ProgressCounter,
    ProgressReporter,
    job_reporter,
    remove_node_progress,
)

logger = logging.getLogger(__name__)


def batch_slices(count: int, batch_size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous [start, end) slices of ``count`` rows made of whole batches of
    ``batch_size`` rows (the last batch may be short); slices past the last batch are empty."""
    batches = -(-count // batch_size)
    out = (
        [
            (min(a * batch_size, count), min(b * batch_size, count))
            for a, b in split_contiguous(batches, parts)
        ]
        if batches
        else []
    )
    return out + [(count, count)] * (parts - len(out))


def node_share(count: int, batch_size: int, num_nodes: int, node_rank: int) -> tuple[int, int]:
    """The [start, end) rows node ``node_rank`` of ``num_nodes`` ranks."""
    return batch_slices(count, batch_size, num_nodes)[node_rank]


def _is_cuda(device: str) -> bool:
    from selm_mcore.rollout.rankers import resolve_device

    return resolve_device(device).startswith("cuda")


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out (CUDA_VISIBLE_DEVICES, else every device)."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def num_workers(cfg: RankingConfig) -> int:
    """ranking.num_workers, or (0) one per visible GPU when the ranker runs on CUDA with
    ranking.device auto or cuda, else 1 (the verifiable ranker loads no model: always 1)."""
    if cfg.kind == "verifiable":
        return 1
    if cfg.num_workers:
        return cfg.num_workers
    if cfg.device in ("auto", "cuda") and _is_cuda(cfg.device):
        return max(1, len(visible_gpus()))
    return 1


def worker_environments(count: int, cfg: RankingConfig) -> list[dict[str, str]]:
    """What each of ``count`` workers adds to its environment: one GPU each (refused when the
    visible ones are fewer), or on the CPU an equal share of the cores as torch threads."""
    if cfg.device in ("auto", "cuda") and _is_cuda(cfg.device):
        gpus = visible_gpus()
        if count > len(gpus):
            raise ConfigError(
                f"ranking.num_workers={count} ranker processes need a GPU each, but this node "
                f"shows {len(gpus)}; lower ranking.num_workers (0 = one per GPU)"
            )
        return [{"CUDA_VISIBLE_DEVICES": gpus[k]} for k in range(count)]
    if "OMP_NUM_THREADS" in os.environ:
        return [{} for _ in range(count)]
    threads = max(1, len(os.sched_getaffinity(0)) // count)
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(count)]


@dataclass
class RankResult:
    """What ranking some rows gives: the kept pairs, every row's stats, held-out scores."""

    pairs: list[dict] = dataclasses.field(default_factory=list)
    stats: list[dict] = dataclasses.field(default_factory=list)
    eval_scores: list[dict] = dataclasses.field(default_factory=list)

    def extend(self, other: RankResult) -> None:
        self.pairs += other.pairs
        self.stats += other.stats
        self.eval_scores += other.eval_scores


@dataclass(frozen=True)
class RankWorkerSpec:
    """One worker's job, ``selm _worker rank SPEC``: written by ``run_rank_workers``."""

    ranking: RankingConfig
    trust_remote_code: bool
    rows: str  # JSONL of the rows to pair ("" = none)
    eval_rows: str  # JSONL of the held-out rows ("" = none)
    generations: str  # JSONL of {prompt_id, responses} for both
    out: str  # folder the worker writes pairs.jsonl, stats.jsonl, eval_scores.jsonl into
    progress: str  # the file it publishes its count of ranked prompts to

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RankWorkerSpec:
        return cls(**{**data, "ranking": RankingConfig(**data["ranking"])})


def rank_here(
    cfg: RankingConfig,
    trust_remote_code: bool,
    rows: Sequence[dict],
    eval_rows: Sequence[dict],
    generations: Mapping[str, list[str]],
    counter: ProgressCounter,
) -> RankResult:
    """Load the ranker in this process and rank ``rows`` and ``eval_rows``."""
    from selm_mcore.rollout.pairs import rank_job

    ranker = build_ranker(cfg, trust_remote_code=trust_remote_code)
    ranker.progress = counter.add
    pairs, stats, scored = rank_job(ranker, rows, eval_rows, generations, cfg.answer_key)
    return RankResult(pairs, stats, scored)


def worker_main(spec: dict) -> int:
    """One ranker process (``selm _worker rank SPEC``, started by ``run_rank_workers``)."""
    job = RankWorkerSpec.from_json(spec)
    generations = {r["prompt_id"]: r["responses"] for r in read_records(job.generations)}
    counter = ProgressCounter(job.progress)
    result = rank_here(
        job.ranking,
        job.trust_remote_code,
        read_records(job.rows) if job.rows else [],
        read_records(job.eval_rows) if job.eval_rows else [],
        generations,
        counter,
    )
    counter.publish()
    out = Path(job.out)
    write_jsonl_atomic(out / "pairs.jsonl", result.pairs)
    write_jsonl_atomic(out / "stats.jsonl", result.stats)
    write_jsonl_atomic(out / "eval_scores.jsonl", result.eval_scores)
    return 0


def _worker_files(
    workdir: Path,
    worker: int,
    rows: Sequence[dict],
    eval_rows: Sequence[dict],
    generations: Mapping[str, list[str]],
) -> tuple[str, str, str]:
    """Write one worker's rows, held-out rows and their generations; their paths."""
    from selm_mcore.data.ids import prompt_key
    from selm_mcore.rollout.pairs import EVAL_ID_PREFIX

    base = workdir / f"worker{worker}"
    base.mkdir()
    ids = [prompt_key(r["prompt_id"], "row") for r in rows] + [
        EVAL_ID_PREFIX + prompt_key(r["prompt_id"], "row") for r in eval_rows
    ]
    write_jsonl_atomic(
        base / "generations.jsonl",
        [
            {"prompt_id": i, "responses": generations[i]}
            for i in dict.fromkeys(ids)
            if i in generations
        ],
    )
    rows_path = eval_path = ""
    if rows:
        write_jsonl_atomic(base / "rows.jsonl", rows)
        rows_path = str(base / "rows.jsonl")
    if eval_rows:
        write_jsonl_atomic(base / "eval_rows.jsonl", eval_rows)
        eval_path = str(base / "eval_rows.jsonl")
    return rows_path, eval_path, str(base / "generations.jsonl")


def run_rank_workers(
    cfg: RankingConfig,
    trust_remote_code: bool,
    rows: Sequence[dict],
    eval_rows: Sequence[dict],
    generations: Mapping[str, list[str]],
    workdir: Path,
    count: int,
    reporter: ProgressReporter,
) -> RankResult:
    """``count`` worker processes over whole-batch slices of ``rows`` and ``eval_rows``; their
    results joined in row order. A failed worker stops the others and raises with its log."""
    row_bounds = batch_slices(len(rows), cfg.batch_size, count)
    eval_bounds = batch_slices(len(eval_rows), cfg.batch_size, count)
    jobs = [
        k
        for k in range(count)
        if row_bounds[k][1] > row_bounds[k][0] or eval_bounds[k][1] > eval_bounds[k][0]
    ]
    environments = worker_environments(len(jobs), cfg)
    with ChildProcesses() as children, reporter:
        for slot, k in enumerate(jobs):
            (r0, r1), (e0, e1) = row_bounds[k], eval_bounds[k]
            rows_path, eval_path, gen_path = _worker_files(
                workdir, k, rows[r0:r1], eval_rows[e0:e1], generations
            )
            spec = RankWorkerSpec(
                cfg,
                trust_remote_code,
                rows_path,
                eval_path,
                gen_path,
                str(workdir / f"worker{k}"),
                str(workdir / f"worker{k}.progress"),
            )
            reporter.add_file(spec.progress)
            children.start_worker("rank", spec.to_json(), workdir, f"worker{k}", environments[slot])
        logger.info(
            "started %d ranker processes on rows %s and held-out rows %s",
            len(jobs),
            [row_bounds[k] for k in jobs],
            [eval_bounds[k] for k in jobs],
        )
        outcome = children.wait(settle_s=1.0)
    if not outcome.ok:
        child = outcome.failed or outcome.running[0]
        k = jobs[children.children.index(child)]
        raise RankerError(
            f"ranker process {k} (rows {row_bounds[k]}, held-out rows {eval_bounds[k]}) exited "
            f"with {child.returncode}; log {child.log_path}:\n{child.tail_chars(3000)}"
        )
    result = RankResult()
    for k in jobs:
        out = workdir / f"worker{k}"
        result.extend(
            RankResult(
                read_records(out / "pairs.jsonl"),
                read_records(out / "stats.jsonl"),
                read_records(out / "eval_scores.jsonl"),
            )
        )
    return result


def rank_rows(
    cfg: RankingConfig,
    trust_remote_code: bool,
    rows: Sequence[dict],
    eval_rows: Sequence[dict],
    generations: Mapping[str, list[str]],
    *,
    progress_path: str | os.PathLike,
    num_nodes: int = 1,
    node_rank: int = 0,
) -> RankResult:
    """Rank this node's share of ``rows`` and ``eval_rows`` with ranking.num_workers
    processes (one: in this process). ``progress_path``: the output the node files of the
    progress count sit next to."""
    total = len(rows) + len(eval_rows)  # of every node: node 0 reports the whole job
    r0, r1 = node_share(len(rows), cfg.batch_size, num_nodes, node_rank)
    e0, e1 = node_share(len(eval_rows), cfg.batch_size, num_nodes, node_rank)
    rows, eval_rows = rows[r0:r1], eval_rows[e0:e1]
    reporter = job_reporter(
        "rank",
        total,
        "prompts",
        out_path=progress_path,
        num_nodes=num_nodes,
        node_rank=node_rank,
    )
    if not rows and not eval_rows:  # more nodes than batches: nothing for this one
        with reporter:
            return RankResult()
    count = min(num_workers(cfg), -(-max(len(rows), len(eval_rows)) // cfg.batch_size))
    if count == 1:
        counter = ProgressCounter()
        reporter.add_source(counter)
        with reporter:
            return rank_here(cfg, trust_remote_code, rows, eval_rows, generations, counter)
    out_dir = Path(progress_path).absolute().parent
    with temp_folder(".rankers.", parent=out_dir) as workdir:
        return run_rank_workers(
            cfg, trust_remote_code, rows, eval_rows, generations, workdir, count, reporter
        )


def merge_rank_nodes(paths: Sequence[str | os.PathLike], num_nodes: int) -> dict[str, int]:
    """Join each output's ``<path>.node<k>.jsonl`` files (every node's) into ``path``
    atomically, in node order, and remove them; refuse a missing node file. Returns the rows
    per output."""
    counts = {}
    for path in paths:
        parts = [node_output_path(path, k) for k in range(num_nodes)]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise RankerError(
                f"ranking on {num_nodes} nodes left no output {missing}: the launcher did not "
                "run `selm rank` on every node (check online.launcher and the phase log)"
            )
        rows = [row for part in parts for row in read_records(part)]
        write_jsonl_atomic(path, rows)
        for part in parts:
            part.unlink()
        remove_node_progress(path, num_nodes)
        counts[str(path)] = len(rows)
    return counts
