"""The CPU compatibility layer applied (selm_mcore.mcore.cpu_compat.apply), in one worker process
(this file re-run as ``python <this file> --worker``, via tests/dist/launch.py): what Megatron
itself now calls behaves like what it replaced, checked against plain torch.

* Megatron's RNG tracker (``tensor_parallel.get_cuda_rng_tracker``) keeps named CPU streams:
  ``fork(name)`` runs on that stream and leaves the default stream as if it never happened;
* Megatron's RNG state hooks (activation recompute) read and write the CPU generator;
* ``get_default_causal_mask``, ``torch.cuda.current_device`` and ``torch.cuda.synchronize`` work
  without CUDA; ``device="cuda"`` tensors land on the CPU; ``apply()`` is idempotent.

The pytest process itself stays unpatched (tests/unit/test_cpu_compat.py).
"""

import sys
from pathlib import Path

import pytest
import torch


def _worker() -> None:
    from launch import emit
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.utils import get_default_causal_mask

    from selm_mcore.mcore import cpu_compat

    report = {
        "applied": cpu_compat.apply(),
        "again": cpu_compat.apply(),
        "is_applied": cpu_compat.is_applied(),
    }

    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    report["tracker_class"] = type(tracker).__name__
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(7)
    expected_default = torch.rand(5)
    torch.manual_seed(7)
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    default = torch.rand(5)  # the default stream continues as if fork() never happened
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    torch.manual_seed(123)
    report["fork_streams_seeded"] = torch.equal(first, torch.rand(3)) and torch.equal(
        second, torch.rand(3)
    )
    report["default_stream_untouched"] = torch.equal(default, expected_default)
    for name, call in (
        ("duplicate_seed", lambda: tracker.add("other", 123)),
        ("unknown_name", lambda: tracker.fork("missing").__enter__()),
    ):
        try:
            call()
            report[name] = None
        except RuntimeError as exc:
            report[name] = str(exc)

    state = torch.get_rng_state()
    report["get_rng_state"] = torch.equal(mrandom._get_cuda_rng_state(), state)
    torch.rand(3)
    mrandom._set_cuda_rng_state(state)
    report["set_rng_state"] = torch.equal(torch.get_rng_state(), state)

    report["causal_mask"] = torch.equal(get_default_causal_mask(4), torch.ones(4, 4).triu(1).bool())
    report["current_device"] = str(torch.cuda.current_device())
    report["synchronize"] = torch.cuda.synchronize()
    report["cuda_tensor_device"] = torch.zeros(2, device="cuda").device.type
    emit(report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="apply() is a no-op with CUDA")
@pytest.mark.timeout(300)
def test_applied_layer_through_megatrons_own_functions():
    from launch import results, run_distributed

    (report,) = results(run_distributed(Path(__file__).resolve(), 1, ["--worker"], timeout_s=240))[
        0
    ]
    assert report["applied"] is True and report["again"] is True and report["is_applied"]
    assert report["tracker_class"] == "CpuRNGStatesTracker"
    assert report["fork_streams_seeded"] and report["default_stream_untouched"]
    assert "seed 123 already exists" in report["duplicate_seed"]
    assert "not added" in report["unknown_name"]
    assert report["get_rng_state"] and report["set_rng_state"]
    assert report["causal_mask"]
    assert report["current_device"] == "cpu" and report["synchronize"] is None
    assert report["cuda_tensor_device"] == "cpu"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker()
