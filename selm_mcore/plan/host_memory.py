"""Host memory of a fully reshardable step checkpoint: the optimizer-state gather per node.

    per_node = gather_bytes_per_node(model, layout, gpus_per_node)   # {node: bytes}
    fmt = last_save_format(cfg, needed, available, node, shard_params)  # or HostMemoryError

A step checkpoint in the ``fully_reshardable`` format (the round's last one; every one with
train.reshardable_checkpoints) gathers, with Megatron's memory-efficient variant, each
model-parallel rank's whole optimizer state onto the host of the replica's DP rank 0: the fp32
parameters and Adam's two moments, 12 bytes per parameter of that rank's model shard
(``selm_mcore.plan.memory.chunk_parameters``; the buffer padding, < 0.1 %, is left out). A node
needs that for every DP-rank-0 process it holds. Megatron numbers the ranks tp fastest, then
dp, then pp (rank = tp_rank + tp * (dp_rank + dp * pp_rank)) and a launcher gives each node a
contiguous block of ranks, so with TP within a node the DP-rank-0 processes of a pipeline stage
share one node: Llama-3-8B at TP2 x DP4 on 8 GPUs puts 2 x 48 GB on its node, Llama-3-70B at TP8
x PP2 x DP4 on 8 nodes 8 x 53 GB on each of two nodes (tests/unit/test_host_memory.py).

The trainer (``selm_mcore.train.trainer``) estimates this for its node before the round trains
and compares it with the memory the node has available (MemAvailable, or less under a cgroup
limit; ``train.host_memory_gb`` overrides it); every rank's verdict is combined. When it does not
fit, the round's last checkpoint is saved dp-reshardable instead (each rank writes its own
shard, no gather; it resumes at the same tp/pp/vpp, and the exported model is resharded at
export anyway), with a warning giving the numbers; with train.reshardable_checkpoints=true,
which asks for fully reshardable checkpoints, the round is refused with the numbers and the
alternative.
"""

from __future__ import annotations

import os
from pathlib import Path

from selm_mcore.modelspec import ModelShape
from selm_mcore.plan.memory import Layout, chunk_parameters
from selm_mcore.runtime.errors import UserError, format_bytes

GATHER_BYTES_PER_PARAM = 12  # fp32 parameter + Adam exp_avg + exp_avg_sq
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
CGROUP_MEMORY_CURRENT = Path("/sys/fs/cgroup/memory.current")


class HostMemoryError(UserError, RuntimeError):
    """A fully reshardable checkpoint that would gather more than a node's host memory."""


def shard_params(model: ModelShape, layout: Layout, pp_rank: int) -> int:
    """Parameters of one model-parallel rank of pipeline stage ``pp_rank`` (every chunk)."""
    return sum(
        numel
        for chunk in range(layout.chunks)
        for numel, _, _ in chunk_parameters(model, layout, pp_rank, chunk)
    )


def dp_rank0_ranks(layout: Layout) -> list[tuple[int, int]]:
    """(global rank, pipeline stage) of every DP-rank-0 process, in Megatron's rank order."""
    return [
        (tp_rank + layout.tp * layout.dp * pp_rank, pp_rank)
        for pp_rank in range(layout.pp)
        for tp_rank in range(layout.tp)
    ]


def gather_bytes_per_node(model: ModelShape, layout: Layout, gpus_per_node: int) -> dict[int, int]:
    """{node: host bytes the fully reshardable gather puts on it} for the nodes that gather."""
    per_stage = [GATHER_BYTES_PER_PARAM * shard_params(model, layout, p) for p in range(layout.pp)]
    out: dict[int, int] = {}
    for rank, pp_rank in dp_rank0_ranks(layout):
        node = rank // gpus_per_node
        out[node] = out.get(node, 0) + per_stage[pp_rank]
    return out


def available_host_bytes() -> int:
    """Memory this node can still give: MemAvailable, or less when a cgroup (v2) limit is
    closer."""
    import psutil

    available = int(psutil.virtual_memory().available)
    try:
        limit = CGROUP_MEMORY_MAX.read_text().strip()
        if limit != "max":
            used = int(CGROUP_MEMORY_CURRENT.read_text().strip())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def describe_gather(node: int, needed: int, processes: int, available: int, source: str) -> str:
    return (
        f"the round's last step checkpoint saves the optimizer state fully reshardable, which "
        f"gathers each model-parallel rank's fp32 parameters and Adam moments "
        f"({GATHER_BYTES_PER_PARAM} bytes per parameter) on its DP rank 0: {processes} such "
        f"process(es) on node {node} need about {format_bytes(needed)} of host memory, more "
        f"than the {format_bytes(available)} {source}"
    )


def last_save_format(
    reshardable_checkpoints: bool,
    node: int,
    needed: int,
    processes: int,
    available: int,
    source: str = "available on it",
) -> tuple[str, str]:
    """(the optimizer format of the round's last step checkpoint, a warning or "") for a node
    whose gather needs ``needed`` bytes with ``available`` to spare; HostMemoryError when it
    does not fit and train.reshardable_checkpoints asks for the gather at every save."""
    if needed <= available:
        return "fully_reshardable", ""
    what = describe_gather(node, needed, processes, available, source)
    if reshardable_checkpoints:
        raise HostMemoryError(
            f"{what}. Fix: set train.reshardable_checkpoints=false: the step checkpoints are "
            "then saved dp-reshardable (each rank writes its own shard, no gather; they resume "
            "at the same tp/pp/vpp, any dp) and the exported model is resharded at export; or "
            "give the nodes more memory (train.host_memory_gb says how much the check may "
            "count on), or use more model parallelism (tp * pp) so each shard is smaller"
        )
    return "dp_reshardable", (
        f"{what}: saving it dp-reshardable instead (each rank writes its own shard, no gather; "
        "it resumes at the same tp/pp/vpp, any dp; the exported model is resharded at export)"
    )


def local_node(rank: int, world_size: int) -> tuple[int, int]:
    """(this node's index, processes per node) from the launcher's LOCAL_WORLD_SIZE (torchrun
    sets it; one node when absent)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    return rank // per_node, per_node
