"""Runs the Triton kernel tests (interpreter_cases.py) in a child pytest with TRITON_INTERPRET=1.

triton.jit chooses the interpreter when a kernel module is imported, from the environment.
Setting the variable in this process (or in a conftest) would leak into every later test
module and into the subprocesses they start; a child process keeps it contained. The child
uses `python -P` so the repository root never lands on sys.path (kernels/ must only be
imported as selm_mcore.kernels).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("interpreter_cases.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_triton_kernel_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-P", "-m", "pytest", str(CASES), "-q", "-rfEs"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"interpreter tests failed (rc={proc.returncode}):\n{output[-20000:]}"
    )
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
    print(summary)
