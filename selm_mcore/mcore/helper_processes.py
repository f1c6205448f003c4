"""Megatron's checkpoint-writer helper processes die with the rank that started them.

    bind_helper_processes()    # once per process; init_parallel calls it

megatron-core 0.16.1 writes a dist checkpoint (``torch_dist``) through
``FileSystemWriterAsync``, even when saving synchronously:

* ``write_preloaded_data_multiproc`` forks one writer process per write bucket (fork context);
* the writers report to a queue held by a ``multiprocessing.Manager`` server, a *spawned*
  process created on the first save (``filesystem_async._get_write_results_queue``) and kept
  for the life of the rank.

A rank killed with SIGKILL (a crash, the OOM killer, torchrun or ``selm run`` killing it) left
that manager running forever (PPID 1, ~275 MB). Here:

* an ``os.register_at_fork`` hook makes every process forked by this one ask for SIGKILL when
  this one dies (the parent-death signal is cleared at fork, so the child must ask itself);
* the results queue comes from our own Manager, started with an initializer that makes the
  server ask for the same signal (a spawned child runs no fork hook).

The queue replaces private Megatron names (``HELPER_TARGETS``); ``check_helper_targets`` (run
here and by ``tests/unit/test_lifetime.py``) fails loudly if they move.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
from multiprocessing.managers import SyncManager

from selm_mcore.runtime.procs import forked_children_die_with_this_process, set_parent_death_signal

FS_ASYNC_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
HELPER_TARGETS = (
    (FS_ASYNC_MODULE, "_get_write_results_queue"),
    (FS_ASYNC_MODULE, "_results_queue"),
)
_BOUND_FLAG = "_selm_dies_with_rank"


def check_helper_targets() -> None:
    """Raise RuntimeError naming the private Megatron names this module needs but is gone."""
    module = importlib.import_module(FS_ASYNC_MODULE)
    missing = [f"{name}.{attr}" for name, attr in HELPER_TARGETS if not hasattr(module, attr)]
    if missing:
        raise RuntimeError(
            f"selm_mcore.mcore.helper_processes needs {', '.join(missing)} of megatron-core "
            "0.16.1, which the installed megatron-core lacks; port the module to its new names"
        )


def _manager_initializer(parent_pid: int) -> None:
    set_parent_death_signal(parent_pid)


def results_queue_dying_with_this_process():
    """Megatron's write-results queue, served by a Manager that dies with this process."""
    module = importlib.import_module(FS_ASYNC_MODULE)
    if module._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_manager_initializer, initargs=(os.getpid(),))
        # The queue proxy keeps a reference to its manager: the server lives as long as it.
        module._results_queue = manager.Queue()
    return module._results_queue


def bind_helper_processes() -> None:
    """Make Megatron's checkpoint-writer processes die with this process (idempotent)."""
    module = importlib.import_module(FS_ASYNC_MODULE)
    if getattr(module, _BOUND_FLAG, False):
        return
    check_helper_targets()
    forked_children_die_with_this_process()
    module._get_write_results_queue = results_queue_dying_with_this_process
    setattr(module, _BOUND_FLAG, True)
