"""Makes tests/dist/launch.py importable as ``launch`` in the dist tests (``from launch import
run_distributed``). Worker scripts run by path get this folder on sys.path from Python itself.
The repository root is never added: kernels/ is only importable as selm_mcore.kernels.

Every dist test but the GPU-marked ones runs with ``CUDA_VISIBLE_DEVICES=""``, so the ranks its
code starts (through launch.py or the converters' own launcher) take the CPU/gloo path.
"""

import sys
from pathlib import Path

import pytest

_DIST_DIR = str(Path(__file__).resolve().parent)
if _DIST_DIR not in sys.path:
    sys.path.insert(0, _DIST_DIR)


@pytest.fixture(autouse=True)
def _hide_cuda(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
