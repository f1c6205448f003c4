"""A plain-torch stand-in for Transformer Engine's FusedAdam (GPU-only, not installable here).

It keeps the three behaviours of TE's ``transformer_engine.pytorch.optimizers.FusedAdam`` that
decide how a checkpoint is saved and loaded, and the same AdamW update (``adam_w_mode=1``,
bias correction on):

* the step count lives in each param group (``group["step"]``, an int), not per parameter;
* the per-parameter state holds only ``exp_avg`` and ``exp_avg_sq`` (zeros at the first step);
* ``state_dict()`` reads every state entry through ``name_to_dtype_map``, so a state key it does
  not know, such as ``"step"``, raises ``KeyError`` (TE's ``get_unscaled_state``).

Used by tests/unit/test_optimizer_state.py and tests/dist/optimizer_worker.py.
"""

from __future__ import annotations

import torch


class FusedAdamLike(torch.optim.Optimizer):
    """AdamW with TE FusedAdam's state layout and state_dict (module docstring)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(
            params,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=True),
        )
        self.name_to_dtype_map = {
            "exp_avg": torch.float32,
            "exp_avg_sq": torch.float32,
            "master_param": torch.float32,
        }

    def get_unscaled_state(self, param, state_name: str) -> torch.Tensor:
        dtype = self.name_to_dtype_map[state_name]  # KeyError for unknown names, as in TE
        value = self.state[param][state_name]
        assert value.dtype == dtype
        return value

    def state_dict(self):
        state_dict = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, value in state_dict["state"].items():
            state_dict["state"][index] = {
                name: self.get_unscaled_state(params[index], name) for name in value
            }
        return state_dict

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            bias1 = 1 - beta1 ** group["step"]
            bias2 = 1 - beta2 ** group["step"]
            for param in group["params"]:
                state = self.state[param]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                if param.grad is None:
                    continue
                grad = param.grad
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                update = state["exp_avg"] / bias1 / denom + group["weight_decay"] * param
                param.add_(update, alpha=-group["lr"])
        return None


def swap_in_fused_adam_like(optimizer) -> None:
    """Replace the torch AdamW inside each of Megatron's distributed optimizers by a
    FusedAdamLike over the same param groups (same hyperparameters and Megatron group keys)."""
    for dist_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = dist_opt.optimizer
        fused = FusedAdamLike([torch.zeros(1, requires_grad=True)])
        # Megatron's shard main params are views (not leaves): installed as Megatron does, by
        # replacing the groups rather than through add_param_group.
        fused.param_groups = [
            {
                **fused.defaults,
                **{
                    key: value
                    for key, value in group.items()
                    if key
                    not in (
                        "foreach",
                        "maximize",
                        "capturable",
                        "differentiable",
                        "fused",
                        "amsgrad",
                        "decoupled_weight_decay",
                    )
                },
            }
            for group in inner.param_groups
        ]
        dist_opt.optimizer = fused
