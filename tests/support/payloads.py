"""A pickle payload shared by the safe-loading tests (unit and dist).

``TouchOnUnpickle(path)`` unpickles as ``os.system("touch PATH")``: a loader that runs it leaves
the file behind, one that refuses it names ``FORBIDDEN`` (the global it would have resolved).
Importable as ``payloads`` from tests (tests/conftest.py) and dist workers (tests/dist/launch.py).
"""

import os
import pickle
import shlex
from pathlib import Path


class TouchOnUnpickle:
    """Unpickling this runs ``touch PATH`` through os.system: the payload of every test here."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.path)}",)


FORBIDDEN = f"{os.system.__module__}.system"  # posix.system on Linux


def write_pickle(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return path
