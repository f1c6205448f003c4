"""selm_mcore.runtime.procs and selm_mcore.mcore.parallel's binding of Megatron's helper processes
without killing anything: the private Megatron names the writer binding replaces exist, the
binding is idempotent, and the launchers' pre-exec hook exists on Linux. The kills themselves
(real SIGKILLs, whole process trees) are in tests/e2e/test_process_lifetime.py."""

from __future__ import annotations

import importlib
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
