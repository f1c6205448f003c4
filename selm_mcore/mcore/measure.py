"""Measured memory of a training rank, for checking the layout planner (``selm bench plan-check``).

    static = static_tensor_bytes(models, ddp_models, optimizer)   # after one optimizer step
    with SavedActivationPeak(exclude=models) as saved:            # around a training step
        train_step(...)
    saved.peak_bytes

``static_tensor_bytes`` sums the storages of the real tensors (each storage once): the model
parameters (Megatron DDP's parameter buffer), DDP's gradient buffers, and the distributed
optimizer's state (fp32 master shards that are not views of the parameters, Adam's exp_avg /
exp_avg_sq / step tensors).

``SavedActivationPeak`` counts what autograd keeps for backward: a ``saved_tensors_hooks`` pack
hook sees every tensor an operation saves (Megatron's activation checkpointing saves its inputs
through the same hooks, and the recomputed layer's tensors pass them in backward); each storage
is counted once while any saved tensor on it is alive, parameters excluded, and a weak reference
tells when autograd lets go of it. The peak of that live sum over a step is the activation
memory the planner predicts, independent of the allocator (CPU resident-set growth would also
count freed-but-cached blocks and the transient temporaries of each kernel).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def static_tensor_bytes(models: Iterable, ddp_models: Iterable, optimizer) -> dict[str, int]:
    """{"params", "grads", "optimizer"}: bytes of the real tensors of this rank."""
    from selm_mcore.mcore.optim import distributed_optimizers

    param_storages = {_storage_key(p) for m in models for p in m.parameters()}
    grad_storages: set[tuple[int, int]] = set()
    for ddp in ddp_models:
        for buffer in [*getattr(ddp, "buffers", []), *getattr(ddp, "expert_parallel_buffers", [])]:
            grad_storages.add(_storage_key(buffer.grad_data))
    state_storages: set[tuple[int, int]] = set()
    for dist_opt in distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        # fp32 master copies of bf16 parameters (the model's own parameters are taken off below)
        for group in inner.param_groups:
            state_storages.update(_storage_key(p) for p in group["params"])
        for state in inner.state.values():
            state_storages.update(
                _storage_key(v) for v in state.values() if isinstance(v, torch.Tensor)
            )
    total = lambda keys: sum(nbytes for _, nbytes in keys)  # noqa: E731
    return {
        "params": total(param_storages),
        "grads": total(grad_storages),
        "optimizer": total(state_storages - param_storages - grad_storages),
    }


class SavedActivationPeak:
    """Peak bytes of the tensors autograd saves for backward inside the ``with`` block."""

    def __init__(self, exclude: Iterable = ()):
        self._excluded = {_storage_key(p)[0] for m in exclude for p in m.parameters()}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [nbytes, saved tensors]
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _release(self, pointer: int) -> None:
        entry = self._live.get(pointer)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._live[pointer]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        pointer, nbytes = _storage_key(tensor)
        if pointer in self._excluded or nbytes == 0:
            return tensor
        entry = self._live.setdefault(pointer, [nbytes, 0])
        if entry[1] == 0:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        weakref.finalize(tensor, self._release, pointer)
        return tensor

    def __enter__(self) -> SavedActivationPeak:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        assert self._hooks is not None  # set by __enter__
        self._hooks.__exit__(*exc_info)
        self._hooks = None
