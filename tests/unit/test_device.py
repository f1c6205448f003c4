"""Fail loudly instead of slowly (selm_mcore.runtime.device): parallel.device=auto expects CUDA
when an NVIDIA device is visible (decided without torch), and CUDA expected but unusable stops
with torch's CUDA build, the driver's version and the fix, before any process group or model
exists; setup.py refuses Pythons older than 3.11 with one line. A visible device is faked with a
device folder holding ``nvidia0``; this machine's torch sees no CUDA device."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selm_mcore.config.schema import ConfigError, ParallelConfig
from selm_mcore.runtime import device
from selm_mcore.runtime.device import CudaUnavailableError

REPO = Path(__file__).resolve().parents[2]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")


@pytest.fixture
def fake_dev(tmp_path):
    """A /dev with one NVIDIA device file."""
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidiactl").touch()
    return tmp_path


def test_visible_nvidia_device_is_found_without_torch(fake_dev, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty_dev")
    assert device.nvidia_device_visible(fake_dev, env={}) == str(fake_dev / "nvidia0")
    assert device.nvidia_device_visible(empty, env={}, use_nvidia_smi=False) == ""
    # CUDA_VISIBLE_DEVICES set to nothing hides every GPU (the CPU/gloo tests rely on it)
    for hidden in ("", "-1", "none"):
        assert device.nvidia_device_visible(fake_dev, env={"CUDA_VISIBLE_DEVICES": hidden}) == ""
    assert device.expected_device("auto", dev_dir=fake_dev, env={})[0] == "cuda"
    assert device.expected_device("cpu", dev_dir=fake_dev, env={})[0] == "cpu"


@needs_no_cuda
def test_cuda_expected_but_unusable_stops_with_versions_and_fix(fake_dev, tmp_path):
    with pytest.raises(CudaUnavailableError) as caught:
        device.check_device("auto", dev_dir=fake_dev, env={})
    message = str(caught.value)
    assert "parallel.device=auto and an NVIDIA device is visible" in message
    assert f"torch {torch.__version__}" in message
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    assert build in message
    assert "NVIDIA driver" in message and "Fix: " in message
    assert "parallel.device=cpu" in message
    with pytest.raises(CudaUnavailableError, match="parallel.device=cuda"):
        device.check_device("cuda", dev_dir=tmp_path, env={})
    # nothing visible, nothing expected: the CPU, without an error
    assert device.check_device("auto", dev_dir=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}) == "cpu"
    assert device.check_device("cpu", dev_dir=fake_dev, env={}) == "cpu"


def test_driver_report_reads_the_kernel_module_version(tmp_path):
    version = tmp_path / "version"
    version.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Tue Jul 15 18:54:14 UTC 2025\n"
        "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
    )
    assert "NVIDIA driver 580.65.06" in device.driver_report(version)
    assert "version unknown" in device.driver_report(tmp_path / "missing")


@needs_no_cuda
def test_init_parallel_and_selm_run_stop_before_starting(monkeypatch):
    """The Megatron phases (init_parallel) and `selm run` (before any phase) check first."""
    from selm_mcore.config.schema import SelmConfig
    from selm_mcore.loop.online import check_run_inputs
    from selm_mcore.mcore.parallel import init_parallel

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(CudaUnavailableError, match="parallel.device=cuda"):
        init_parallel(device="cuda")
    cfg = SelmConfig()
    cfg.parallel.device = "cuda"
    with pytest.raises(CudaUnavailableError, match="sees no CUDA device"):
        check_run_inputs(cfg)


def _build_has_gpu_in_a_child(pythonpath: str | None = None) -> list[str]:
    """``torch_build_has_gpu()`` in a fresh interpreter, and whether it imported torch."""
    code = (
        "import sys; from selm_mcore.runtime.device import torch_build_has_gpu; "
        "print(torch_build_has_gpu(), 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, str(REPO)]))}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_the_torch_build_is_read_without_importing_torch(tmp_path):
    """`selm run` decides "no CUDA" on a CPU-only torch from torch/version.py alone; the answer
    is torch's own (torch.version, imported here), and a CUDA or ROCm build says True."""
    built_for_gpu = bool(torch.version.cuda or torch.version.hip)
    assert _build_has_gpu_in_a_child() == [str(built_for_gpu), "False"]
    for field in ("cuda", "hip"):
        fake = tmp_path / field / "torch"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('the fake torch is not imported')\n")
        (fake / "version.py").write_text(f"cuda = None\nhip = None\n{field} = '12.4'\n")
        assert _build_has_gpu_in_a_child(str(tmp_path / field)) == ["True", "False"]
    if not built_for_gpu:
        assert device.check_device("auto", dev_dir=tmp_path, env={}) == "cpu"


def test_parallel_device_is_validated():
    with pytest.raises(ConfigError, match="parallel.device='gpu' is not one of auto, cuda, cpu"):
        ParallelConfig(device="gpu").validate()


def test_setup_py_refuses_old_pythons_with_one_line(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    with pytest.raises(SystemExit) as caught:
        runpy.run_path(str(REPO / "setup.py"))
    message = str(caught.value)
    assert "selm-mcore needs Python >= 3.11" in message and "\n" not in message
    text = (REPO / "setup.py").read_text()
    assert 'python_requires=">=3.11"' in text and '"megatron-core==0.16.1"' in text
