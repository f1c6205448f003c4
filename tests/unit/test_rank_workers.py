"""How ranking is spread (selm_mcore.rollout.rank_workers): whole batches per worker and node
(so every batch is the one a single process would rank), the default worker count, each
worker's GPU or CPU share, joining node outputs, and the rank phase's per-node command. The
workers themselves run in tests/e2e/test_rank_workers.py (real llm-blender classes)."""

from __future__ import annotations

import shlex

import pytest

from selm_mcore.config.schema import ConfigError, RankingConfig
from selm_mcore.rollout import rank_workers
from selm_mcore.rollout.engines import node_output_path
from selm_mcore.rollout.rank_workers import (
    batch_slices,
    merge_rank_nodes,
    node_share,
    num_workers,
    worker_environments,
)
from selm_mcore.rollout.rankers import RankerError
from selm_mcore.runtime.files import read_records, write_jsonl_atomic


@pytest.mark.parametrize(
    "count, batch, parts", [(10, 2, 2), (11, 4, 3), (3, 8, 4), (0, 2, 2), (100, 32, 8)]
)
def test_batch_slices_cut_at_whole_batches(count, batch, parts):
    slices = batch_slices(count, batch, parts)
    assert len(slices) == parts
    covered = [i for start, end in slices for i in range(start, end)]
    assert covered == list(range(count))  # contiguous, in order, every row once
    # every slice starts at a batch boundary, so its batches are the one-process batches
    assert all(start % batch == 0 or start == end == count for start, end in slices)
    # nodes, then each node's workers: still whole batches of the one-process cut
    for node in range(parts):
        start, end = node_share(count, batch, parts, node)
        inner = [(start + a, start + b) for a, b in batch_slices(end - start, batch, 2)]
        assert all(a % batch == 0 or a == b for a, b in inner)


def test_default_worker_count(monkeypatch):
    monkeypatch.setattr(rank_workers, "_is_cuda", lambda device: device != "cpu")
    monkeypatch.setattr(rank_workers, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert num_workers(RankingConfig(device="cuda")) == 4  # one per GPU of the node
    assert num_workers(RankingConfig(device="auto")) == 4
    assert num_workers(RankingConfig(device="cuda:1")) == 1  # pinned to one GPU
    assert num_workers(RankingConfig(device="cpu")) == 1
    assert num_workers(RankingConfig(device="cuda", num_workers=2)) == 2
    assert num_workers(RankingConfig(kind="verifiable", num_workers=3)) == 1
    envs = worker_environments(4, RankingConfig(device="cuda"))
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"]
    with pytest.raises(ConfigError, match="ranking.num_workers=5 ranker processes need a GPU"):
        worker_environments(5, RankingConfig(device="cuda"))
    with pytest.raises(ConfigError, match="ranking.num_workers=-1"):
        RankingConfig(num_workers=-1).validate()


def test_cpu_workers_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(rank_workers.os, "sched_getaffinity", lambda pid: set(range(8)))
    envs = worker_environments(2, RankingConfig(device="cpu"))
    assert envs == [{"OMP_NUM_THREADS": "4"}, {"OMP_NUM_THREADS": "4"}]


def test_merge_rank_nodes(tmp_path):
    out, stats = tmp_path / "pairs.jsonl", tmp_path / "stats.jsonl"
    for node, ids in enumerate((["a", "b"], ["c"])):
        write_jsonl_atomic(node_output_path(out, node), [{"prompt_id": i} for i in ids])
        write_jsonl_atomic(node_output_path(stats, node), [{"prompt_id": i} for i in ids])
    assert merge_rank_nodes([out, stats], 2) == {str(out): 3, str(stats): 3}
    assert [r["prompt_id"] for r in read_records(out)] == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "stats.jsonl"]
    with pytest.raises(RankerError, match="did not run `selm rank` on every node"):
        merge_rank_nodes([out], 2)


def test_rank_phase_runs_once_per_node_through_the_launcher():
    from selm_mcore.config.io import load_config
    from selm_mcore.loop.rounds import rank_command

    base = ["online.nproc_per_node=8", "online.rdzv_endpoint=head:29500"]
    cmd = ["selm", "rank", "c.yaml", "--rows", "r.jsonl"]
    assert rank_command(load_config(None, base), cmd) == cmd
    multi = load_config(
        None, base + ["online.nnodes=4", "online.launcher=srun --nodes=4 --ntasks-per-node=1"]
    )
    assert rank_command(multi, cmd) == [
        *shlex.split("srun --nodes=4 --ntasks-per-node=1"),
        *cmd,
        "--num-nodes",
        "4",
    ]
