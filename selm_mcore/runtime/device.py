"""Which device a run uses, and a loud stop when it expects CUDA that torch cannot use.

    device = check_device(cfg.parallel.device)     # "cuda" or "cpu"; raises CudaUnavailableError

``parallel.device``: ``cuda`` (a GPU is required), ``cpu`` (run on the CPU even where GPUs are
visible: ``use_cpu`` hides them from this process and its children), or ``auto``: ``cuda`` when
an NVIDIA device is visible on this machine (or torch sees one), else ``cpu``. Visibility is
decided without torch (``nvidia_device_visible``: a ``/dev/nvidia<N>`` device file, or
``nvidia-smi -L`` listing a GPU; ``CUDA_VISIBLE_DEVICES`` set to nothing, ``-1`` or ``none``
hides them), because the case this guards against is torch not seeing a GPU that is there: on a
driver too old for the CUDA build of torch, ``torch.cuda.is_available()`` is False and every
phase would run on the CPU, days slower, without an error. When CUDA is expected and torch sees
none, ``CudaUnavailableError`` names torch's version and CUDA build, the driver's version and
the CUDA version it supports (``driver_report``), torch's own warning, and the fix.

Called where a command starts its device work: ``init_parallel`` (train, refpass, the
benchmarks), ``selm run`` before any phase, ``selm generate`` and the rankers' device choice.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

from selm_mcore.runtime.errors import UserError

DEVICE_CHOICES = ("auto", "cuda", "cpu")
DEV_DIR = Path("/dev")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
HIDDEN_VALUES = ("", "-1", "none", "void")  # CUDA_VISIBLE_DEVICES values that hide every GPU


class CudaUnavailableError(UserError, RuntimeError):
    """CUDA is expected (parallel.device) but torch cannot use it."""


def gpus_hidden(env: dict[str, str] | None = None) -> bool:
    """Whether CUDA_VISIBLE_DEVICES hides every GPU from this process."""
    env = dict(os.environ) if env is None else env
    value = env.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip().lower() in HIDDEN_VALUES


def nvidia_device_visible(
    dev_dir: Path = DEV_DIR, *, env: dict[str, str] | None = None, use_nvidia_smi: bool = True
) -> str:
    """Why this machine has a visible NVIDIA device ("/dev/nvidia0", "nvidia-smi: GPU 0: ..."),
    or "" when it has none (or CUDA_VISIBLE_DEVICES hides them). No torch involved."""
    if gpus_hidden(env):
        return ""
    devices = sorted(glob.glob(str(dev_dir / "nvidia[0-9]*")))
    if devices:
        return devices[0]
    if use_nvidia_smi and shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
        gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
        if gpus:
            return f"nvidia-smi: {gpus[0].strip()}"
    return ""


def expected_device(
    setting: str, *, dev_dir: Path = DEV_DIR, env: dict[str, str] | None = None
) -> tuple[str, str]:
    """(``cuda`` or ``cpu``, why) for a ``parallel.device`` setting."""
    if setting not in DEVICE_CHOICES:
        raise CudaUnavailableError(
            f"parallel.device={setting!r} is not one of {', '.join(DEVICE_CHOICES)}"
        )
    if setting != "auto":
        return setting, f"parallel.device={setting}"
    seen = nvidia_device_visible(dev_dir, env=env)
    if seen:
        return "cuda", f"parallel.device=auto and an NVIDIA device is visible ({seen})"
    return "cpu", "parallel.device=auto and no NVIDIA device is visible"


def _cuda_driver_api_version() -> str:
    """The CUDA version the installed driver supports (libcuda's cuDriverGetVersion), or ""."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return ""
    except (OSError, AttributeError):
        return ""
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def driver_report(version_file: Path = DRIVER_VERSION_FILE) -> str:
    """The NVIDIA driver's version and the CUDA version it supports, as far as found."""
    driver = ""
    if version_file.is_file():
        match = re.search(
            r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", version_file.read_text()
        )
        driver = match.group(1) if match else ""
    if not driver and shutil.which("nvidia-smi"):
        try:
            driver = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                .stdout.split("\n")[0]
                .strip()
            )
        except (OSError, subprocess.SubprocessError):
            driver = ""
    cuda = _cuda_driver_api_version()
    return (
        f"NVIDIA driver {driver or 'version unknown (no ' + str(version_file) + ', no nvidia-smi)'}"
        + (f", supporting CUDA up to {cuda}" if cuda else ", libcuda not loadable")
    )


def _torch_version_module() -> ModuleType | None:
    """``torch.version``: imported already, or its file run on its own (it imports nothing of
    torch); None when there is no such file."""
    if "torch.version" in sys.modules:
        return sys.modules["torch.version"]
    spec = importlib.util.find_spec("torch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "version.py" if locations else None
    if path is None or not path.is_file():
        return None
    version_spec = importlib.util.spec_from_file_location("_selm_torch_version", path)
    if version_spec is None or version_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(version_spec)
    version_spec.loader.exec_module(module)
    return module


def torch_build_has_gpu() -> bool:
    """Whether the installed torch is built for CUDA or ROCm, read from ``torch/version.py``
    without importing torch (seconds of CPU), so a process that needs torch for nothing else
    (``selm run``) does not import it on a CPU-only build, where ``torch.cuda.is_available()``
    is always False. True when it cannot tell."""
    try:
        version = _torch_version_module()
    except Exception:  # an unreadable version file: torch itself decides
        return True
    if version is None:
        return True
    return bool(getattr(version, "cuda", None) or getattr(version, "hip", None))


def _torch_cuda_state() -> tuple[bool, str]:
    """(torch.cuda.is_available(), the warning torch gave while deciding, if any)."""
    if not torch_build_has_gpu():
        return False, ""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    said = "; ".join(str(w.message).strip() for w in caught)
    return available, said


def cuda_unavailable_message(why: str, torch_warning: str, driver: str) -> str:
    """The error text: what expected CUDA, what torch and the driver are, and the fix."""
    import torch

    built = torch.version.cuda
    build = f"built for CUDA {built}" if built else "a CPU-only build"
    if built:
        fix = (
            f"install a torch built for a CUDA version the driver supports (pip install "
            f"torch==<version> --index-url https://download.pytorch.org/whl/cu<XY>), or update "
            f"the NVIDIA driver to one that supports CUDA {built}"
        )
    else:
        fix = "install a CUDA build of torch (pip install 'selm-mcore[gpu]')"
    return (
        f"CUDA is expected ({why}) but torch {torch.__version__} ({build}) sees no CUDA device; "
        f"{driver}"
        + (f"; torch says: {torch_warning}" if torch_warning else "")
        + f". Fix: {fix}; or check CUDA_VISIBLE_DEVICES. To run on the CPU on purpose, set "
        "parallel.device=cpu."
    )


def check_device(
    setting: str, *, dev_dir: Path = DEV_DIR, env: dict[str, str] | None = None
) -> str:
    """The device a run with ``parallel.device=setting`` uses: ``cuda`` or ``cpu``. Raises
    ``CudaUnavailableError`` when CUDA is expected and torch sees no CUDA device."""
    device, why = expected_device(setting, dev_dir=dev_dir, env=env)
    if setting == "cpu":
        return "cpu"
    available, torch_warning = _torch_cuda_state()
    if device == "cpu":  # auto, nothing visible: a GPU torch does see is still used
        return "cuda" if available else "cpu"
    if not available:
        raise CudaUnavailableError(cuda_unavailable_message(why, torch_warning, driver_report()))
    return "cuda"


def use_cpu() -> None:
    """Hide every GPU from this process and the processes it starts (parallel.device=cpu on a
    GPU machine); call before CUDA is first used."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def apply_device_setting(setting: str) -> str:
    """``check_device``, and for ``cpu`` hide the GPUs (``use_cpu``): what every command that
    starts device work calls first."""
    device = check_device(setting)
    if setting == "cpu" and nvidia_device_visible():
        use_cpu()
    return device
