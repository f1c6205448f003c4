"""The environment of a ``selm`` command a test starts: offline, one thread, no fault injection.

Importable as ``child_env`` from tests (tests/conftest.py).
"""

import os

INJECTION_VARIABLES = ("SELM_FAULT", "SELM_TRAIN_KILL_AFTER_STEP", "SELM_DIE_WITH_PARENT")


def child_env() -> dict[str, str]:
    """This process's environment without the fault-injection variables, offline, 1 thread."""
    env = {k: v for k, v in os.environ.items() if k not in INJECTION_VARIABLES}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONSAFEPATH="1",
    )
    return env
