"""DPO / IPO / SELM losses on sequence log-probs, plain torch.

Inputs are per-example sequence log-probs [B]: SUMS of token log-probs over the response tokens
(no length normalisation), for the policy (with grad) and the frozen reference (no grad). With

    h = (logp_pi(y_w) - logp_pi(y_l)) - (logp_ref(y_w) - logp_ref(y_l))

the per-example loss is

    sigmoid (DPO, SELM's choice):  -logsigmoid(beta * h)
    ipo:                           (h_avg - 1 / (2 * beta)) ** 2
    + optimism (SELM):             alpha * beta * (logp_pi(y_ref) - logp_ref(y_ref))
    + SFT (optional):              sft_weight * (-logp_pi(y_w) / |y_w|)

* The optimism weight is alpha * beta, not alpha: alpha is exposed as the paper and its reference
  code expose it (the reference code multiplies by beta; the paper's Algorithm 1 writes alpha).
  With beta = 0.01 and alpha = 1e-3 the term's effective weight is 1e-5.
* logp_ref(y_ref) is detached: it changes only the logged value, not the gradient.
* alpha = 0 is exactly iterative DPO: the optimism term is then not added at all.
* IPO follows TRL (0.8.x), whose IPO runs on token-AVERAGED log-probs: h_avg uses
  logp / num_tokens for chosen and rejected, so ``chosen_num_tokens`` and ``rejected_num_tokens``
  are required. The target margin 1 / (2 beta) is that of the IPO paper (Eq. 17).
* Label smoothing is not offered: the reference code accepts it but ignores it.

Metrics are detached per-example tensors [B] (reduce with ``.mean()``, or sum + count across
micro-batches); rewards are beta * (policy - reference) on SUMMED log-probs for every loss type.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def _check_inputs(
    *, beta: float, alpha: float, loss_type: str, **tensors: torch.Tensor | None
) -> None:
    """Refuse settings and shapes ``selm_loss`` cannot use, naming the argument."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0 (0 = iterative DPO)")
    if (tensors["policy_yref_logps"] is None) != (tensors["ref_yref_logps"] is None):
        raise ValueError("pass both policy_yref_logps and ref_yref_logps, or neither")
    if alpha > 0 and tensors["policy_yref_logps"] is None:
        raise ValueError(
            f"alpha={alpha} > 0 needs y_ref log-probs (policy_yref_logps, "
            "ref_yref_logps); set alpha=0 for plain DPO"
        )
    policy_chosen = tensors["policy_chosen_logps"]
    assert policy_chosen is not None  # a required argument of selm_loss
    shape = policy_chosen.shape
    for name, value in tensors.items():
        if value is not None and (value.dim() != 1 or value.shape != shape):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; every input must be [B] "
                f"with B={shape[0] if len(shape) else '?'}"
            )


def _preference_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    chosen_num_tokens: torch.Tensor | None,
    rejected_num_tokens: torch.Tensor | None,
) -> torch.Tensor:
    """The DPO (sigmoid) or IPO term per example [B] from fp32 sequence log-probs."""
    if loss_type == "sigmoid":
        h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
        return -F.logsigmoid(beta * h)
    if chosen_num_tokens is None or rejected_num_tokens is None:
        raise ValueError(
            "loss_type='ipo' averages log-probs over tokens (as TRL does): pass "
            "chosen_num_tokens and rejected_num_tokens"
        )
    n_chosen = chosen_num_tokens.float().clamp(min=1)
    n_rejected = rejected_num_tokens.float().clamp(min=1)
    h_avg = (pi_chosen / n_chosen - pi_rejected / n_rejected) - (
        ref_chosen / n_chosen - ref_rejected / n_rejected
    )
    return (h_avg - 1.0 / (2.0 * beta)) ** 2


def selm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    policy_yref_logps: torch.Tensor | None = None,
    ref_yref_logps: torch.Tensor | None = None,
    *,
    beta: float,
    alpha: float,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
    chosen_num_tokens: torch.Tensor | None = None,
    rejected_num_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SELM loss per example [B] (fp32) and detached per-example metrics (see module doc).

    ``policy_yref_logps``/``ref_yref_logps`` are required when ``alpha > 0`` and logged whenever
    given. ``chosen_num_tokens`` (response tokens of y_w, [B]) is required for ``sft_weight > 0``
    and, with ``rejected_num_tokens``, for ``loss_type="ipo"``.
    """
    _check_inputs(
        beta=beta,
        alpha=alpha,
        loss_type=loss_type,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        policy_yref_logps=policy_yref_logps,
        ref_yref_logps=ref_yref_logps,
        chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens,
    )

    # fp32 throughout; the reference side never carries gradient.
    pi_chosen = policy_chosen_logps.float()
    pi_rejected = policy_rejected_logps.float()
    ref_chosen = ref_chosen_logps.detach().float()
    ref_rejected = ref_rejected_logps.detach().float()

    preference_loss = _preference_loss(
        pi_chosen,
        pi_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=loss_type,
        chosen_num_tokens=chosen_num_tokens,
        rejected_num_tokens=rejected_num_tokens,
    )
    loss = preference_loss

    metrics: dict[str, torch.Tensor] = {}
    if policy_yref_logps is not None and ref_yref_logps is not None:  # both or neither
        pi_yref = policy_yref_logps.float()
        ref_yref = ref_yref_logps.detach().float()
        optimism = alpha * beta * (pi_yref - ref_yref)
        if alpha > 0:
            loss = loss + optimism
        metrics["logps/pi_response"] = pi_yref.detach()
        metrics["logps/ref_response"] = ref_yref
        metrics["loss/optimism"] = optimism.detach()

    if sft_weight > 0:
        if chosen_num_tokens is None:
            raise ValueError("sft_weight > 0 needs chosen_num_tokens (response tokens of y_w)")
        sft = -pi_chosen / chosen_num_tokens.float().clamp(min=1)
        loss = loss + sft_weight * sft
        metrics["loss/sft"] = sft.detach()

    metrics.update(_pair_metrics(beta, pi_chosen, pi_rejected, ref_chosen, ref_rejected))
    metrics["loss/preference"] = preference_loss.detach()
    return loss, metrics


def _pair_metrics(
    beta: float,
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Implicit rewards (beta * (policy - reference) on summed log-probs) and the log-probs."""
    chosen_rewards = beta * (pi_chosen.detach() - ref_chosen)
    rejected_rewards = beta * (pi_rejected.detach() - ref_rejected)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": pi_chosen.detach(),
        "logps/rejected": pi_rejected.detach(),
        "logps/ref_chosen": ref_chosen,
        "logps/ref_rejected": ref_rejected,
    }
