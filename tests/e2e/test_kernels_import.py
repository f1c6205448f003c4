"""The folder kernels/ is importable only as ``selm_mcore.kernels``, also in child processes.

A top-level package named ``kernels`` would collide with the PyPI package ``kernels`` that
transformers probes for (it would then try to load hub kernels). Checked from a process
started outside the repository, as an installed user would run it, and from a phase child that
``selm run`` starts in the repository root. (The pytest process itself: tests/unit/test_layout.py.)
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from selm_mcore.loop.runner import run_command

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.util, json
import selm_mcore.kernels as k
from transformers.utils.import_utils import is_kernels_available
spec = importlib.util.find_spec("kernels")
print(json.dumps({"selm_kernels_file": k.__file__,
                  "top_level_kernels": spec.origin if spec else None,
                  "transformers_kernels_available": is_kernels_available()}))
"""


def test_kernels_folder_is_selm_mcore_kernels_only():
    with tempfile.TemporaryDirectory() as outside:
        proc = subprocess.run(
            [sys.executable, "-c", PROBE],
            cwd=outside,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(probe["selm_kernels_file"]).resolve() == REPO / "kernels" / "__init__.py"
    top = probe["top_level_kernels"]
    assert top is None or REPO not in Path(top).resolve().parents, top
    assert probe["transformers_kernels_available"] is False


def test_phase_children_started_from_the_repo_root_cannot_import_top_level_kernels(
    tmp_path, monkeypatch
):
    """`selm run` starts its phases with `python -m ...`, which would put the working directory
    on sys.path; from the repository root that would expose kernels/ as a top-level package."""
    monkeypatch.chdir(REPO)
    probe = (
        "import importlib.util, sys; import selm_mcore.kernels; "
        "sys.exit(3 if importlib.util.find_spec('kernels') else 0)"
    )
    run_command([sys.executable, "-c", probe], tmp_path / "probe.log", timeout_s=120)
