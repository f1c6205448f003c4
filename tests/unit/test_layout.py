"""The project's source layout rules, checked on the source files themselves:

* ``selm_mcore/mcore/`` is the one folder that imports Megatron: no module elsewhere under
  ``selm_mcore/`` or ``kernels/`` imports ``megatron`` (module level or inside a function);
* short files: no source module over ``MAX_LINES`` lines, no function (``def`` at any depth,
  methods and nested functions included) over ``MAX_FUNCTION_LINES`` lines;
* the folder kernels/ is imported only as ``selm_mcore.kernels`` (never as top-level
  ``kernels``; child processes: tests/e2e/test_kernels_import.py).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = (REPO / "selm_mcore", REPO / "kernels")
MEGATRON_DIR = REPO / "selm_mcore" / "mcore"
MAX_LINES = 550
MAX_FUNCTION_LINES = 80


def source_files() -> list[Path]:
    return sorted(
        p for root in SOURCE_DIRS for p in root.rglob("*.py") if "__pycache__" not in p.parts
    )


def megatron_imports(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: statement`` for every import of megatron in ``source``, at any depth:
    ``import megatron...``, ``from megatron... import``, and ``importlib.import_module`` /
    ``__import__`` of a literal name starting with megatron."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                names = [node.args[0].value]
        if any(n == "megatron" or n.startswith("megatron.") for n in names):
            found.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_the_scanner_finds_imports_at_any_depth():
    source = (
        "import os\n"
        "import megatron.core as mc\n"
        "def build():\n"
        "    from megatron.core import parallel_state\n"
        "    class Inner:\n"
        "        def f(self):\n"
        "            import importlib\n"
        "            return importlib.import_module('megatron.core.optimizer')\n"
        "from selm_mcore.mcore.forward import megatron_ce_token_logps\n"
        "import megatron_like_name\n"
    )
    assert [line.split(":")[1] for line in megatron_imports(source)] == ["2", "4", "8"]


def test_megatron_is_imported_only_under_selm_mcore_mcore():
    files = source_files()
    assert any(MEGATRON_DIR in p.parents for p in files)  # the scan sees the mcore package
    assert (REPO / "kernels" / "bench_logprobs.py") in files
    offenders = []
    for path in files:
        if MEGATRON_DIR in path.parents:
            continue
        offenders += megatron_imports(path.read_text(), str(path.relative_to(REPO)))
    assert not offenders, (
        "megatron imported outside selm_mcore/mcore/ (go through a plain "
        "function of selm_mcore.mcore instead):\n" + "\n".join(offenders)
    )


def test_no_source_module_is_longer_than_the_limit():
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in source_files()}
    assert len(lengths) > 20
    offenders = {name: n for name, n in lengths.items() if n > MAX_LINES}
    if offenders:
        print(f"modules over {MAX_LINES} lines:")
        for name, n in sorted(offenders.items(), key=lambda item: -item[1]):
            print(f"  {n:5d}  {name}")
    assert not offenders, f"modules over {MAX_LINES} lines (split them): {offenders}"


def long_functions(source: str, filename: str = "<source>", limit: int = MAX_FUNCTION_LINES):
    """{``file:line name``: lines} of every function (any depth) longer than ``limit`` lines,
    from its ``def`` (or first decorator: not counted) to its last line."""
    found = {}
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                found[f"{filename}:{node.lineno} {node.name}"] = length
    return found


def test_the_function_scan_measures_nested_functions_and_methods():
    body = "".join(f"    x{i} = {i}\n" for i in range(4))
    source = (
        "def short():\n    return 1\n"
        "class Holder:\n"
        "    def method(self):\n"
        "        def inner():\n" + body.replace("    ", "            ") + "        return inner\n"
        "async def coroutine():\n" + body
    )
    # method: def + inner's 5 lines + return = 7; inner: 5; coroutine: 5; short: 2
    assert long_functions(source, limit=4) == {
        "<source>:4 method": 7,
        "<source>:5 inner": 5,
        "<source>:11 coroutine": 5,
    }


def test_no_function_is_longer_than_the_limit():
    offenders = {}
    for path in source_files():
        offenders.update(long_functions(path.read_text(), str(path.relative_to(REPO))))
    if offenders:
        print(f"functions over {MAX_FUNCTION_LINES} lines:")
        for name, n in sorted(offenders.items(), key=lambda item: -item[1]):
            print(f"  {n:5d}  {name}")
    assert not offenders, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into named helpers): {offenders}"
    )


def test_kernels_resolve_to_the_repo_folder_as_selm_mcore_kernels():
    import selm_mcore.kernels

    assert Path(selm_mcore.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert str(REPO) not in [str(Path(p).resolve()) for p in sys.path if p]
    if "kernels" in sys.modules:  # e.g. the PyPI package; never this folder
        origin = getattr(sys.modules["kernels"], "__file__", None) or ""
        assert REPO not in Path(origin).resolve().parents, origin
