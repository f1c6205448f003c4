#!/usr/bin/env bash
# Sets up the pinned environment (see tools/setup_env.sh) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh tests/unit -k loss`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
bash "$repo/tools/setup_env.sh"
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/pytest "${@:-tests}"
