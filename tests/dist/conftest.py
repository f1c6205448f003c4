"""Makes tests/dist/launch.py importable as ``launch`` in the dist tests (``from launch import
run_distributed``). Worker scripts run by path get this folder on sys.path from Python itself.
The repository root is never added: kernels/ is only importable as selm_mcore.kernels.
"""
import sys
from pathlib import Path

_DIST_DIR = str(Path(__file__).resolve().parent)
if _DIST_DIR not in sys.path:
    sys.path.insert(0, _DIST_DIR)
