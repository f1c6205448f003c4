"""The shape of a run's ``manifest.json``, checked when it is read (``loop.runner.Manifest``).

    problem = manifest_problem(json.loads(text))   # None, or what is wrong, in a few words

The manifest is only ever replaced atomically by the runner, so a manifest of another shape
was edited by hand (or is not a manifest): the run then stops with one line naming the file and
what is wrong (``[]`` at the top, a string where the config belongs, ``phases`` as a list, a
hash that is not a string), instead of failing later inside the runner.

    {"format": str, "config": {...}, "inputs": {name: str},
     "phases": {name: {"output": str, "sha256": str, "seconds": number, "finished_at": str}},
     "publishing": {"phase": str, "output": str, "sha256": str, "seconds": number},
     "last_error": {"phase": str, "message": str}}      # inputs, publishing, last_error optional
"""

from __future__ import annotations

from typing import Any

from selm_mcore.runtime.errors import short_repr

_RECORD_FIELDS = {"output": str, "sha256": str, "seconds": (int, float)}
_PUBLISHING_FIELDS = {"phase": str, **_RECORD_FIELDS}
_ERROR_FIELDS = {"phase": str, "message": str}


def _kind(value: Any) -> str:
    names: dict[type, str] = {dict: "an object", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _fields_problem(where: str, record: Any, fields: dict[str, Any]) -> str | None:
    if not isinstance(record, dict):
        return f"{where} must be an object, got {_kind(record)}"
    for key, types in fields.items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{where}.{key}={short_repr(value)} must be {_describe(types)}"
    return None


def _describe(types: Any) -> str:
    return "a string" if types is str else "a number"


def manifest_problem(data: Any) -> str | None:
    """What is wrong with a decoded manifest's shape (module docstring), or None."""
    if not isinstance(data, dict):
        return f"the manifest must be a JSON object, got {_kind(data)}"
    if not isinstance(data.get("format"), str):
        return f"format={short_repr(data.get('format'))} must be a string"
    if not isinstance(data.get("config", {}), dict):
        return f"config must be an object, got {_kind(data['config'])}"
    if not isinstance(data.get("phases"), dict):
        return f"phases must be an object of phase records, got {_kind(data.get('phases'))}"
    for name, record in data["phases"].items():
        problem = _fields_problem(f"phases.{name}", record, _RECORD_FIELDS)
        if problem:
            return problem
    inputs = data.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
        return "inputs must be an object of content hashes (strings)"
    for key, fields in (("publishing", _PUBLISHING_FIELDS), ("last_error", _ERROR_FIELDS)):
        if data.get(key) is not None:
            problem = _fields_problem(key, data[key], fields)
            if problem:
                return problem
    return None
