#!/usr/bin/env bash
# Sets up the pinned environment (see tools/setup_env.sh), checks lint, format and types, and runs
# the test suite on SELM_TEST_WORKERS (default 2) pytest-xdist workers, printing its 25 slowest
# tests (tests/conftest.py keeps the multi-process tests on one worker).
#
#   bash tools/test.sh                       # everything: ruff, ruff format --check, mypy, pytest
#   bash tools/test.sh tests/unit -k loss    # pytest with these arguments only (no lint/types)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -eq 0 ]; then
  # Settings in pyproject.toml; mypy's cache lives beside the cached environment.
  .venv/bin/python -m ruff check selm_mcore kernels tools tests setup.py
  .venv/bin/python -m ruff format --check selm_mcore kernels tools tests setup.py
  .venv/bin/python -m mypy --cache-dir "${SELM_CACHE_DIR:-$HOME/.cache/selm-mcore}/mypy"
  exec .venv/bin/pytest -n "${SELM_TEST_WORKERS:-2}" --dist loadscope --durations=25 tests
fi
exec .venv/bin/pytest "$@"
