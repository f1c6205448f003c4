"""CPU compatibility layer for megatron-core 0.16.1 (applied only when CUDA is absent).

megatron-core assumes a GPU in a few dozen places that have nothing to do with the maths: RNG
state handling, scratch buffers allocated on ``torch.cuda.current_device()``, explicit
``torch.cuda.synchronize()`` calls, tensors created with a literal ``device="cuda"`` and type
checks against ``'torch.cuda.FloatTensor'``. On a CPU-only machine (CI, laptops) this module
makes those places run on the CPU so that the real Megatron model, schedules, optimizer and
dist checkpointing run over gloo, numerically equal to TP=1 in fp32.

    from selm_mcore.mcore import cpu_compat
    cpu_compat.apply()      # idempotent; a no-op when CUDA is available

``selm_mcore.mcore.parallel.init_parallel`` calls ``apply()``; nothing else needs to. The patches
touch private Megatron names, so megatron-core is pinned to ``MEGATRON_CORE_VERSION`` on CPU and
``tests/unit/test_cpu_compat.py`` fails loudly (via ``check_patch_targets``) if a name moves.

What is patched:

* RNG: Megatron's ``CudaRNGStatesTracker`` is replaced by ``CpuRNGStatesTracker`` (same API,
  CPU generator states), and ``tensor_parallel.random._get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` (activation recompute) read/write the CPU generator.
* ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (used as a device for
  scratch buffers, rotary tables, p2p receive buffers, all-gather outputs).
* ``torch.cuda.synchronize()`` is a no-op (p2p batch sync, checkpoint pre-load).
* ``transformer.utils.get_default_causal_mask`` (also imported by name into
  ``fusions.fused_softmax``) builds the mask on the CPU.
* ``CudaToCpuMode``, a ``TorchFunctionMode`` pushed for the rest of the process, maps
  ``device="cuda"`` arguments, ``Tensor.cuda()`` and ``Tensor.to("cuda")`` to the CPU and
  reports CUDA type names from ``Tensor.type()`` (pipeline schedules' ``total_num_tokens``,
  optimizer ``found_inf``/scale tensors, ``clip_grads`` and distributed-optimizer type checks).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

MEGATRON_CORE_VERSION = "0.16.1"

# (module, attribute) pairs this layer reads or replaces. check_patch_targets() verifies each.
PATCH_TARGETS: tuple[tuple[str, str], ...] = (
    ("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER"),
    ("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED"),
    ("megatron.core.tensor_parallel.random", "initialize_rng_tracker"),
    ("megatron.core.transformer.utils", "get_default_causal_mask"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
)

# Methods of CudaRNGStatesTracker that CpuRNGStatesTracker relies on or overrides.
_TRACKER_METHODS = ("reset", "get_states", "set_states", "add", "fork", "is_initialized")

_APPLIED_FLAG = "_selm_cpu_compat_applied"


def check_patch_targets() -> None:
    """Raise RuntimeError naming every private Megatron/torch name this layer needs but is gone."""
    missing = []
    for module_name, attr in PATCH_TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing.append(f"{module_name} (import failed: {exc})")
            continue
        if not hasattr(module, attr):
            missing.append(f"{module_name}.{attr}")
    tracker_cls = _original_tracker_class()
    for method in _TRACKER_METHODS:
        if not callable(getattr(tracker_cls, method, None)):
            missing.append(f"megatron.core.tensor_parallel.random.CudaRNGStatesTracker.{method}")
    if missing:
        import megatron.core

        raise RuntimeError(
            "selm_mcore.mcore.cpu_compat targets private names of megatron-core "
            f"{MEGATRON_CORE_VERSION}, but these are missing in the installed megatron-core "
            f"{getattr(megatron.core, '__version__', '?')}: {', '.join(missing)}. "
            f"Install megatron-core=={MEGATRON_CORE_VERSION} on CPU machines, or port "
            "selm_mcore/mcore/cpu_compat.py to the new names."
        )


def _original_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    cls = mrandom.CudaRNGStatesTracker
    return getattr(cls, "_selm_original", cls)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return False


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Runs code written for ``device="cuda"`` on the CPU.

    Maps a CUDA ``device`` keyword, ``Tensor.cuda()`` and ``Tensor.to(<cuda device>)`` to the
    CPU, and makes ``Tensor.type()`` (no arguments) report the CUDA type name that Megatron's
    optimizer and grad-clipping asserts expect.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_current_device():
    return torch.device("cpu")


def _noop_synchronize(device=None):
    return None


@functools.cache
def _cpu_tracker_class():
    """CudaRNGStatesTracker with the same API, keeping CPU generator states instead."""
    base = _original_tracker_class()
    from megatron.core.tensor_parallel.random import _MODEL_PARALLEL_RNG_TRACKER_NAME

    class CpuRNGStatesTracker(base):
        """Named CPU RNG states; ``fork(name)`` swaps the CPU generator to that state."""

        _selm_original = base

        def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
            super().__init__(
                use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker
            )

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"RNG seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"RNG state {name} already exists")
            orig_state = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig_state)

        @contextlib.contextmanager
        def fork(self, name=_MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"RNG state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    cpu_cls = _cpu_tracker_class()
    mrandom.CudaRNGStatesTracker = cpu_cls
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, cpu_cls):
        # A CUDA tracker created before apply() would call torch.cuda on first use.
        mrandom.initialize_rng_tracker(force_reset=True)


def _push_mode_once() -> None:
    from torch.overrides import _get_current_function_mode_stack

    if not any(isinstance(m, CudaToCpuMode) for m in _get_current_function_mode_stack()):
        # Stays on the (thread-local) torch-function-mode stack for the rest of the process.
        CudaToCpuMode().__enter__()


def is_applied() -> bool:
    """True when this process runs with the CPU compatibility layer."""
    return bool(getattr(torch.cuda, _APPLIED_FLAG, False))


def apply(force: bool = False) -> bool:
    """Apply the layer once per process if CUDA is absent (or ``force``). Returns True if active."""
    if torch.cuda.is_available() and not force:
        return False
    if is_applied():
        _push_mode_once()  # the mode stack is per thread
        return True
    import megatron.core

    version = getattr(megatron.core, "__version__", "?")
    if version != MEGATRON_CORE_VERSION:
        logger.warning(
            "selm_mcore.mcore.cpu_compat was written for megatron-core==%s, found %s; "
            "checking the private names it patches",
            MEGATRON_CORE_VERSION,
            version,
        )
    check_patch_targets()

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as mutils

    _install_rng_tracker()
    mutils.get_default_causal_mask = _cpu_default_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _noop_synchronize
    _push_mode_once()
    setattr(torch.cuda, _APPLIED_FLAG, True)
    logger.info("megatron-core CPU compatibility layer applied (no CUDA device)")
    return True
