"""torch.distributed + Megatron model-parallel set-up, returned as a small ``ParallelContext``.

    ctx = init_parallel(tp=2, pp=2, vpp=None, seed=1234)   # under torchrun, or 1 process
    ctx = init_parallel(tp=2, sequence_parallel=True)      # also on CPU (gloo)
    ctx = init_parallel_from(cfg.parallel)                 # a config's parallel section
    ...                                                      # pass ctx to whoever needs groups
    destroy_parallel()

Backends: NCCL on GPU (one device per local rank), gloo on CPU, where the CPU compatibility
layer for megatron-core (``selm_mcore.mcore.cpu_compat``) is applied first. Under torchrun the
process group is created from the environment (``init_method="env://"``: a ``tcp://`` URL on
another port hangs under torchrun); a plain single process gets an in-memory store, no port
needed.

Megatron still keeps its groups in ``megatron.core.parallel_state`` (its model classes read them
from there); this module initialises that state and hands the groups on explicitly so our own
code never reads the globals. Local multi-process launches live in ``selm_mcore.runtime.launch``.

Megatron's checkpoint-writer helper processes die with the rank that started them
(``bind_helper_processes``, called by ``init_parallel``). megatron-core 0.16.1 writes a dist
checkpoint (``torch_dist``) through ``FileSystemWriterAsync``, even when saving synchronously:
``write_preloaded_data_multiproc`` forks one writer process per write bucket, so a fork hook
makes every process forked by a rank ask for SIGKILL when the rank dies (the parent-death
signal is cleared at fork, so the child must ask itself; ``selm_mcore.runtime.procs``). The
rank then puts its writers' results on a global results queue and reads them back itself.
Megatron makes that queue a ``multiprocessing.Manager`` queue, for its asynchronous saves: a
*spawned* server process created on the first save and kept for the life of the rank (~275 MB
and a torch import, left running forever when the rank was SIGKILLed). Every save here is
synchronous (``dist_checkpointing.save``: the writer results are put and read in the rank's own
process), so the rank gets a queue of its own process instead and starts no server. It replaces
private Megatron names (``HELPER_TARGETS``); ``check_helper_targets`` (run at binding and by
``tests/unit/test_lifetime.py``) fails loudly if they move.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from selm_mcore.runtime.errors import UserError
from selm_mcore.runtime.procs import forked_children_die_with_this_process

if TYPE_CHECKING:
    from selm_mcore.config.schema import ParallelConfig

logger = logging.getLogger(__name__)

FS_ASYNC_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
HELPER_TARGETS = (
    (FS_ASYNC_MODULE, "_get_write_results_queue"),
    (FS_ASYNC_MODULE, "_results_queue"),
)
_BOUND_FLAG = "_selm_dies_with_rank"


class ParallelLayoutError(UserError, ValueError):
    """A parallel layout that cannot work (world size, tp/pp/vpp against the model)."""


@dataclass
class ParallelContext:
    """Ranks and process groups of this process; passed explicitly to whoever needs them."""

    rank: int
    world_size: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    device: torch.device
    local_rank: int = 0
    seed: int = 1234
    # Sequence parallelism (parallel.sequence_parallel resolved: sequence_parallel_enabled).
    sequence_parallel: bool = False

    @property
    def is_first_stage(self) -> bool:
        """This rank holds the embedding (pipeline stage 0)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the final norm and output layer (last pipeline stage)."""
        return self.pp_rank == self.pp - 1

    @property
    def num_chunks(self) -> int:
        """Model chunks per rank: vpp with interleaved pipelining, else 1."""
        return self.vpp or 1


def _init_process_group(backend: str) -> None:
    if dist.is_initialized():
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        # One process without a launcher: an in-memory store needs no free port.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def check_helper_targets() -> None:
    """Raise RuntimeError naming the private Megatron names ``bind_helper_processes`` needs but
    the installed megatron-core lacks."""
    module = importlib.import_module(FS_ASYNC_MODULE)
    missing = [f"{name}.{attr}" for name, attr in HELPER_TARGETS if not hasattr(module, attr)]
    if missing:
        raise RuntimeError(
            f"selm_mcore.mcore.parallel.bind_helper_processes needs {', '.join(missing)} of "
            "megatron-core 0.16.1, which the installed megatron-core lacks; port it to the new "
            "names"
        )


def results_queue_of_this_process() -> queue.Queue:
    """Megatron's write-results queue for synchronous saves: one queue of this process (the rank
    puts the results of the writers it forked and reads them back; no server process)."""
    module: Any = importlib.import_module(FS_ASYNC_MODULE)  # private names, checked above
    if module._results_queue is None:
        module._results_queue = queue.Queue()
    return module._results_queue


def bind_helper_processes() -> None:
    """Make Megatron's checkpoint-writer processes die with this process (idempotent)."""
    module: Any = importlib.import_module(FS_ASYNC_MODULE)
    if getattr(module, _BOUND_FLAG, False):
        return
    check_helper_targets()
    forked_children_die_with_this_process()
    module._get_write_results_queue = results_queue_of_this_process
    setattr(module, _BOUND_FLAG, True)


def sequence_parallel_enabled(mode: str | bool, tp: int, on_gpu: bool | None = None) -> bool:
    """``parallel.sequence_parallel`` resolved for ``tp``: "auto" = on with tp > 1 on a GPU
    (``on_gpu``; None = whether torch sees CUDA), "true" = on (needs tp > 1: it splits the
    sequence over the tensor-parallel ranks; also on CPU/gloo), "false" = off."""
    if isinstance(mode, bool):
        mode = "true" if mode else "false"
    if mode not in ("auto", "true", "false"):
        raise ParallelLayoutError(
            f"parallel.sequence_parallel={mode!r} is not one of auto, true, false"
        )
    if mode == "true" and tp < 2:
        raise ParallelLayoutError(
            "parallel.sequence_parallel=true needs parallel.tp > 1 (it splits each sequence "
            f"over the tensor-parallel ranks; tp={tp}); set it to auto or false"
        )
    if mode == "auto":
        return tp > 1 and (torch.cuda.is_available() if on_gpu is None else on_gpu)
    return mode == "true"


def sequence_length_multiple(tp: int, mode: str | bool = "auto", on_gpu: bool | None = None) -> int:
    """What every micro-batch's token count T must be a multiple of: tp under sequence
    parallelism (each rank holds T/tp positions between layers and in the pipeline's p2p
    messages), else 1."""
    return tp if sequence_parallel_enabled(mode, tp, on_gpu) else 1


def _check_sizes(tp: int, pp: int, vpp: int | None) -> None:
    """The layout's sizes on their own (before any process group exists)."""
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ParallelLayoutError(f"{name}={value!r} must be an integer >= 1")
    if vpp is not None and (vpp < 2 or pp < 2):
        raise ParallelLayoutError(
            f"parallel.vpp={vpp} needs vpp >= 2 and pp >= 2 (pp={pp}); use vpp=None for plain 1F1B"
        )


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    seed: int = 1234,
    sequence_parallel: str | bool = "auto",
    device: str = "auto",
) -> ParallelContext:
    """Initialise torch.distributed (env:// or one process) and Megatron's TP/PP/VPP/DP groups.

    Seeds torch and Megatron's model-parallel RNG tracker with ``seed`` (the tensor-parallel
    state differs per TP rank as in Megatron; weights created with use_cpu_initialization are
    TP-invariant). Raises ParallelLayoutError when the world size is not a multiple of tp*pp,
    and ``CudaUnavailableError`` when ``device`` (parallel.device) expects CUDA that torch cannot
    use (``selm_mcore.runtime.device``), before anything else. ``sequence_parallel``: auto /
    true / false (``sequence_parallel_enabled``).
    """
    from selm_mcore.runtime.device import apply_device_setting

    use_cuda = apply_device_setting(device) == "cuda"
    from megatron.core import parallel_state, tensor_parallel

    _check_sizes(tp, pp, vpp)
    bind_helper_processes()  # Megatron's checkpoint writers die with this rank
    sequence_parallel = sequence_parallel_enabled(sequence_parallel, tp, use_cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        from selm_mcore.mcore import cpu_compat

        cpu_compat.apply()
        torch_device = torch.device("cpu")
    _init_process_group("nccl" if use_cuda else "gloo")

    world_size = dist.get_world_size()
    if world_size % (tp * pp) != 0:
        raise ParallelLayoutError(
            f"world size {world_size} must be a multiple of parallel.tp*parallel.pp = "
            f"{tp}*{pp} = {tp * pp}; launch tp*pp*dp processes (torchrun --nproc-per-node)"
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    ctx = ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        device=torch_device,
        local_rank=local_rank,
        seed=seed,
        sequence_parallel=sequence_parallel,
    )
    logger.info(
        "parallel: world=%d tp=%d pp=%d vpp=%s dp=%d%s backend=%s",
        *(world_size, tp, pp, vpp, ctx.dp, " sequence-parallel" if sequence_parallel else ""),
        dist.get_backend(),
    )
    return ctx


def init_parallel_from(parallel: ParallelConfig) -> ParallelContext:
    """``init_parallel`` with a config's ``parallel`` section (every key of it)."""
    return init_parallel(
        tp=parallel.tp,
        pp=parallel.pp,
        vpp=parallel.vpp,
        seed=parallel.seed,
        sequence_parallel=parallel.sequence_parallel,
        device=parallel.device,
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_tensor_parallel_groups(tp: int) -> None:
    """Megatron's parallel state with ``tp`` tensor-parallel ranks over an existing process
    group (for code that reads Megatron's globals, e.g. its cross entropy in the benchmarks)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
