#!/usr/bin/env bash
# Creates (once) the virtual environment of the TRL peer used by `selm bench compare-trl` and
# prints its python interpreter on the last line of stdout.
#
# TRL pins its own stack (datasets, pandas, ...), so it lives in its own environment outside the
# checkout, in
#   ${SELM_CACHE_DIR:-$HOME/.cache/selm-mcore}/trl-venv-<hash of this script>
# Idempotent: a finished environment is reused (a few ms); a change to the pins below builds a
# new one (~2-4 min, mostly datasets/pandas wheels). The comparison is only fair when both sides
# run the same torch and the same HF model code, so torch and transformers match our pins
# (requirements/cpu.txt). torch is installed FIRST from the CPU wheel: letting pip resolve torch
# through TRL's dependencies would download a CUDA build.
set -euo pipefail
TORCH_PIN="torch==2.13.0"
PEER_PINS=(trl==1.16.0 transformers==5.19.0 accelerate==1.15.0 "datasets>=4.7,<5" psutil==7.2.2)

cache=${SELM_CACHE_DIR:-$HOME/.cache/selm-mcore}
hash=$(sha256sum "$0" | cut -c1-12)
venv=$cache/trl-venv-$hash
mkdir -p "$cache"

build() {
  echo "[setup-trl] building $venv (first time only)" >&2
  rm -rf "$venv"
  python3.11 -m venv "$venv"
  local pip="$venv/bin/python -m pip --disable-pip-version-check -q"
  $pip install "$TORCH_PIN" >&2
  $pip install "${PEER_PINS[@]}" "$TORCH_PIN" >&2  # torch named again: never upgraded
  "$venv/bin/python" - <<'EOF' >&2
import torch, transformers, trl
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, torch.__version__
print(f"[setup-trl] torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
EOF
  touch "$venv/.complete"
}

(
  flock 9
  [ -f "$venv/.complete" ] || build
) 9>"$cache/.lock-trl-$hash"
echo "$venv/bin/python"
