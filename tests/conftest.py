"""Fixtures shared by every test folder (unit, kernels, dist, e2e).

* ``tiny_llama_dir``: one tiny random Llama HF folder
  (``selm_mcore.testing.assets.build_tiny_llama`` with its defaults: 4 layers, hidden 128,
  head_dim 32, untied, seed 0, the tiny ChatML tokenizer), built once per session. Treat it as
  read-only: a test that changes files copies it first; a test that needs another config builds
  its own.
* ``tiny_tokenizer_dir`` / ``tiny_tokenizer``: the tiny ChatML tokenizer alone (session).
* ``write_jsonl(path, rows) -> path``: one ``json.dumps`` line per row (ASCII escapes, so a
  lone surrogate in a string is written as ``\\ud800`` and reaches the reader as such).
* ``write_config(path, **sections) -> path``: a YAML config file, e.g.
  ``write_config(p, model={"hf_dir": str(d)}, train={"global_batch_size": 2})``.
* ``preference_row(prompt, chosen, rejected, **extra) -> dict``: one row in the
  UltraFeedback-binarized schema (one user turn, then the assistant's answer).

Helpers are fixtures returning callables because test modules are imported with
``--import-mode=importlib`` (pytest.ini): a conftest cannot be imported from a test module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# Helper modules several test folders import by name (e.g. ``payloads``); dist workers get the
# same folder from tests/dist/launch.py.
SUPPORT_DIR = str(Path(__file__).resolve().parent / "support")
if SUPPORT_DIR not in sys.path:
    sys.path.insert(0, SUPPORT_DIR)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from selm_mcore.testing.assets import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from selm_mcore.testing.assets import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def _write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _write_config(path, **sections) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sections))
    return path


def _preference_row(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        **extra,
    }


@pytest.fixture(scope="session")
def write_jsonl():
    return _write_jsonl


@pytest.fixture(scope="session")
def write_config():
    return _write_config


@pytest.fixture(scope="session")
def preference_row():
    return _preference_row


# Modules that read one session-scoped run (tests/e2e/conftest.py's ``paper_run``): one work unit.
SHARED_RUN_MODULES = {
    "tests/e2e/test_online.py": "tests/e2e/paper_run",
    "tests/e2e/test_eval_run.py": "tests/e2e/paper_run",
}
# The longest work units, longest first (on the 2-core machine the shared run's group and
# tests/dist take many minutes each, the others about two minutes or less). They start
# before every other unit: xdist orders units by their number of tests, which would start these
# few-test units last and leave one worker idle while the other finishes them.
LONGEST_FIRST = (
    "tests/e2e/paper_run",
    "tests/dist",
    "tests/e2e/test_generation.py",
    "tests/e2e/test_bench_smoke.py",
    "tests/e2e/test_gpu_check.py",
    "tests/e2e/test_output_safety.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """How tools/test.sh spreads the suite over its pytest-xdist workers: one work unit per test
    module (or group of modules sharing one session-scoped run), so an expensive run happens once,
    on one worker; and one unit for all of tests/dist, whose tests start 2-4 busy gloo ranks
    each, so they run one after another instead of two of them oversubscribing the cores. The
    units of ``LONGEST_FIRST`` are handed out first, in that order. (xdist's own ``xdist_group``
    marks do not group under pytest 9, whose node ids xdist can no longer rename.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndRanks(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module.startswith("tests/dist/"):
                return "tests/dist"
            return SHARED_RUN_MODULES.get(module, module)

        def _assign_work_unit(self, node) -> None:
            for scope in LONGEST_FIRST:
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
                    break
            super()._assign_work_unit(node)

    return ModulesAndRanks(config, log)
