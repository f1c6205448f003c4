"""Host memory of the round's last, fully reshardable save (selm_mcore.plan.host_memory): the
gather per node for Llama-3-8B on 8 GPUs and Llama-3-70B on 64, against 12 bytes x the model's
parameters computed from the published shapes (each replica's DP rank 0 holds one copy of the
whole model's optimizer state), and the decision: fits, switch to dp-reshardable with the
numbers, or refuse with the numbers and the alternative. The trainer's use of it (a tiny
train.host_memory_gb makes the last checkpoint dp-reshardable) is checked in
tests/dist/test_train_parallel.py::test_dp2_killed_and_resumed_matches_tp1."""

from __future__ import annotations

import pytest

from selm_mcore.modelspec import ModelShape
from selm_mcore.plan.host_memory import (
    HostMemoryError,
    dp_rank0_ranks,
    gather_bytes_per_node,
    last_save_format,
)
from selm_mcore.plan.known import KNOWN_MODELS
from selm_mcore.plan.memory import Layout

GB = 1e9


def shape(name: str) -> ModelShape:
    return ModelShape.from_hf_config(KNOWN_MODELS[name][0])


def test_llama3_8b_tp2_dp4_on_one_node():
    model = shape("meta-llama/Meta-Llama-3-8B-Instruct")
    layout = Layout(tp=2, pp=1, vpp=None, dp=4)
    assert [rank for rank, _ in dp_rank0_ranks(layout)] == [0, 1]
    per_node = gather_bytes_per_node(model, layout, gpus_per_node=8)
    assert list(per_node) == [0]
    # one replica's state: 12 bytes for every one of the 8.03B parameters, ~48 GB per process
    assert per_node[0] == pytest.approx(12 * model.num_params(), rel=1e-3)
    assert 96 * GB < per_node[0] < 97 * GB


def test_llama3_70b_tp8_pp2_dp4_on_eight_nodes():
    model = shape("meta-llama/Meta-Llama-3-70B-Instruct")
    layout = Layout(tp=8, pp=2, vpp=None, dp=4)
    per_node = gather_bytes_per_node(model, layout, gpus_per_node=8)
    # stage 0's DP rank 0 group is ranks 0-7 (node 0), stage 1's ranks 32-39 (node 4)
    assert sorted(per_node) == [0, 4]
    assert sum(per_node.values()) == pytest.approx(12 * model.num_params(), rel=1e-3)
    assert all(420 * GB < b < 430 * GB for b in per_node.values())
    # with interleaving, each stage still holds half the layers: the same per node
    interleaved = gather_bytes_per_node(model, Layout(tp=8, pp=2, vpp=2, dp=4), 8)
    assert interleaved == pytest.approx(per_node, rel=1e-3)


def test_the_decision_and_its_message():
    assert last_save_format(False, 0, 96 * 10**9, 2, 200 * 10**9) == ("fully_reshardable", "")
    fmt, warning = last_save_format(False, 4, 423 * 10**9, 8, 300 * 10**9)
    assert fmt == "dp_reshardable"
    assert "8 such process(es) on node 4 need about 393.9 GiB" in warning
    assert "279.4 GiB available on it" in warning and "saving it dp-reshardable" in warning
    with pytest.raises(HostMemoryError) as caught:
        last_save_format(True, 4, 423 * 10**9, 8, 300 * 10**9)
    message = str(caught.value)
    assert "393.9 GiB" in message and "Fix: set train.reshardable_checkpoints=false" in message
    assert "resharded at export" in message
