# Sourced by the GPU example scripts: `fetch REPO_ID LOCAL_DIR [hf download args...]` downloads a
# Hugging Face repository once (a `.complete` marker says it is all there) and says what and
# where. Needs huggingface_hub's `hf` (or the older `huggingface-cli`) on PATH.
hf_cli=$(command -v hf || command -v huggingface-cli || true)

fetch() {
  local repo_id=$1 dir=$2; shift 2
  if [ -e "$dir/.complete" ]; then echo "[selm] have $repo_id in $dir"; return; fi
  if [ -z "$hf_cli" ]; then
    echo "[selm] need $repo_id in $dir: install huggingface_hub (pip install huggingface_hub)" >&2
    exit 1
  fi
  echo "[selm] downloading $repo_id -> $dir"
  "$hf_cli" download "$repo_id" "$@" --local-dir "$dir"
  touch "$dir/.complete"
}
