"""selm_mcore.runtime.procs and selm_mcore.mcore.parallel's binding of Megatron's helper processes
without killing anything: the private Megatron names the writer binding replaces exist, the
binding is idempotent, the launchers' pre-exec hook exists on Linux, and a heap frozen at exit
still finalizes its garbage. The kills themselves (real SIGKILLs, whole process trees) are in
tests/e2e/test_process_lifetime.py."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from selm_mcore.runtime import procs as lifetime


def test_megatron_names_the_writer_binding_replaces_exist():
    from selm_mcore.mcore.parallel import check_helper_targets

    check_helper_targets()


def test_binding_replaces_megatrons_results_queue_once():
    from selm_mcore.mcore import parallel

    module = importlib.import_module(parallel.FS_ASYNC_MODULE)
    parallel.bind_helper_processes()
    parallel.bind_helper_processes()
    assert module._get_write_results_queue is parallel.results_queue_of_this_process


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_launchers_get_a_pre_exec_hook_and_a_marker_on_linux():
    assert callable(lifetime.die_with_parent_preexec())
    assert lifetime.parent_death_signal() is not None  # prctl answers (0: none for pytest)
    env = lifetime.child_env({"A": "1"})
    assert env == {"A": "1", lifetime.DIE_WITH_PARENT_ENV: str(__import__("os").getpid())}


def test_the_heap_frozen_at_exit_still_finalizes_its_garbage(tmp_path):
    """freeze_heap_at_exit (every selm command): one exit handler per process, which collects
    and then freezes the heap after the handlers registered later have run; a reference cycle
    that is garbage at exit is still finalized (its __del__ writes a file)."""
    marker = tmp_path / "finalized"
    script = f"""
import atexit, gc
atexit.register(lambda: print("frozen at the end:", gc.get_freeze_count() > 0, flush=True))
from selm_mcore.runtime.procs import freeze_heap_at_exit
before = atexit._ncallbacks()
freeze_heap_at_exit()
freeze_heap_at_exit()
print("handlers added:", atexit._ncallbacks() - before, flush=True)
atexit.register(lambda: print("frozen for a later handler:", gc.get_freeze_count() > 0, flush=True))

class Cycle:
    def __del__(self):
        open({str(marker)!r}, "w").write("yes")

cycle = Cycle()
cycle.me = cycle
del cycle
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert out == [
        "handlers added: 1",
        "frozen for a later handler: False",
        "frozen at the end: True",
    ]
    assert marker.read_text() == "yes"
