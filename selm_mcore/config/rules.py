"""The rules every config value follows: the user error they raise (``ConfigError``), the
range of each float key (``NUMBER_RULES``, checked by ``check_numbers``) and the one-of-a-list
check (``check_choice``). Plain Python: the schema and its sections import it."""

from __future__ import annotations

import math
import typing
from typing import Any

from selm_mcore.runtime.errors import UserError, short_repr


class ConfigError(UserError, ValueError):
    """A user-fixable problem in a config file or override."""


# The range of each float value (every float value must also be finite: NaN passes every
# comparison and inf trains to an all-NaN model). Keys without a rule need only be finite. A
# section with float fields calls check_numbers first in its validate().
NUMBER_RULES = {
    "loss.beta": "> 0",
    "loss.alpha": ">= 0",
    "loss.sft_weight": ">= 0",
    "optim.lr": ">= 0",
    "optim.lr_per_round": ">= 0",
    "optim.min_lr": ">= 0",
    "optim.weight_decay": ">= 0",
    "optim.adam_beta1": "in [0, 1)",
    "optim.adam_beta2": "in [0, 1)",
    "optim.adam_eps": "> 0",
    "optim.warmup_ratio": "in [0, 1)",
    "optim.clip_grad": ">= 0",
    "train.host_memory_gb": ">= 0",
    "generation.temperature": ">= 0",
    "generation.top_p": "in (0, 1]",
    "generation.gpu_memory_utilization": "in (0, 1]",
    "generation.kv_cache_memory_gb": ">= 0",
    "generation.reload_timeout_s": ">= 0",
    "eval.alpaca_eval_temperature": ">= 0",
    "eval.alpaca_eval_top_p": "in (0, 1]",
}


def _satisfies(value: float, rule: str) -> bool:
    """``value`` within ``rule``: "> x", ">= x" or an interval "in [a, b)" (any brackets)."""
    if rule.startswith("in "):
        low, high = (float(x) for x in rule[4:-1].split(","))
        return ((low <= value) if rule[3] == "[" else (low < value)) and (
            (value <= high) if rule[-1] == "]" else (value < high)
        )
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def check_numbers(section_name: str, section: Any) -> None:
    """Every float value of a section (list entries too) is finite and within its
    ``NUMBER_RULES`` range (each section's ``validate`` calls this first)."""
    for name, annotation in typing.get_type_hints(type(section)).items():
        if "float" not in str(annotation):
            continue
        key, value = f"{section_name}.{name}", getattr(section, name)
        items = (
            [(f"{key}[{i}]", v) for i, v in enumerate(value)]
            if isinstance(value, list)
            else [(key, value)]
        )
        rule = NUMBER_RULES.get(key, "")
        for item_key, item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue  # None of an optional field; types are checked on load
            if not math.isfinite(item) or (rule and not _satisfies(item, rule)):
                raise ConfigError(
                    f"{item_key}={short_repr(item)} must be a finite number {rule}".rstrip()
                )


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Refuse a value outside ``allowed``, naming the key and the choices."""
    if value not in allowed:
        raise ConfigError(f"{key}={short_repr(value)} is not one of {', '.join(allowed)}")
