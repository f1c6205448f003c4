"""Prompt ids in one normalised form: the string every file and join of the project uses.

    key = prompt_key(row.get("prompt_id"), where="rows.jsonl row 3")   # "17" for 17 or "17"

A data file may write a prompt id as a string or an integer (``17``); ``selm generate`` writes
the string (``"17"``), so every comparison of ids (generation rows with the rows they answer,
repeated ids, held-out prompts) goes through ``prompt_key``. Anything else (a float, a bool, a
list, a missing id) is refused naming the row.
"""

from __future__ import annotations

from typing import Any

from selm_mcore.runtime.errors import InputError, short_repr


def prompt_key(value: Any, where: str) -> str:
    """The normalised form of a prompt id: the string itself, or an integer's digits; raises
    ``InputError`` naming ``where`` for a missing id or another type."""
    if value is None:
        raise InputError(
            f"{where}: missing 'prompt_id'; give every row a prompt_id (a string or integer) that "
            "its generated responses are matched by"
        )
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # more digits than Python converts
            pass
    raise InputError(
        f"{where}: prompt_id={short_repr(value)} must be a string or an integer, got "
        f"{type(value).__name__}; write it as a string"
    )
