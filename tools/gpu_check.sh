#!/usr/bin/env bash
# The GPU check: one command, about 5 minutes (budget 450 s, hard stop per part) on one
# H100/H200 with only stock PyTorch and Triton installed. Writes OUTDIR/gpu_check.json and
# OUTDIR/gpu_check.md (selm_mcore/bench/gpu_report.py); everything else goes to stdout.
#
#   bash tools/gpu_check.sh OUTDIR [--mcore-wheel megatron_core-0.16.1-...whl]
#   bash tools/gpu_check.sh --dry OUTDIR      # every part at tiny sizes on CPU (the CI test)
#
# Parts (each recorded with its exit status, seconds and a note; a failed part does not stop
# the others):
#   env        versions; which of megatron-core, Transformer Engine, flash-attn, vLLM import
#   tests      pytest -m gpu: the compiled Triton kernel against the torch reference, the
#              packed-attention flash test (skips without flash-attn), the TE/bf16 parity test
#   kernels    selm_mcore.kernels.bench_logprobs at V = 128,256 and 64,128 (one TP2 rank),
#              4k-16k tokens: Triton vs Megatron's vocab-parallel cross entropy, forward and
#              forward+backward, time against the HBM floor, peak memory
#   train_*    selm bench plan-check: a Llama-3-8B-width model with 4 layers, bf16, packing
#              shared_prompt, the distributed optimizer, through the trainer's step; the
#              planner's memory next to the measured peak, tokens/s and MFU (recompute none
#              and full)
#   logprob    selm bench logprob-path: a training step with the fused kernel vs Megatron CE
#   vllm       selm bench generation on a tiny model, only when vLLM imports
# megatron-core is needed by train_*, logprob and the kernels' Megatron column: give its wheel
# (--mcore-wheel, $MCORE_WHEEL, or .whl/megatron_core-*.whl in the checkout); it is installed
# with pip --target into a scratch folder. Without Transformer Engine the layers use Megatron's
# local spec; without flash-attn the packed attention uses torch SDPA; both are said in the
# notes. PYTHON picks the interpreter (default python3; --dry: the checkout's .venv).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dry=0
out=""
wheel=${MCORE_WHEEL:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry) dry=1 ;;
    --mcore-wheel) wheel=$2; shift ;;
    -*) echo "usage: bash tools/gpu_check.sh [--dry] [--mcore-wheel WHEEL] OUTDIR" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "usage: bash tools/gpu_check.sh [--dry] [--mcore-wheel WHEEL] OUTDIR" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ "$dry" = 1 ] && [ -x "$repo/.venv/bin/python" ]; then python=${PYTHON:-$repo/.venv/bin/python}
else python=${PYTHON:-python3}; fi
work=${GPU_CHECK_WORK:-$(mktemp -d /tmp/selm-gpu-check.XXXXXX)}
mkdir -p "$work"
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-450}))
status=$work/status.tsv
: > "$status"

# selm_mcore importable from this checkout without installing it (kernels/ is selm_mcore.kernels)
site=$work/site
rm -rf "$site/selm_mcore" && mkdir -p "$site/selm_mcore"
for entry in "$repo"/selm_mcore/*; do ln -s "$entry" "$site/selm_mcore/"; done
ln -s "$repo/kernels" "$site/selm_mcore/kernels"
if [ -z "$wheel" ]; then wheel=$(ls "$repo"/.whl/megatron_core-*.whl 2>/dev/null | head -1); fi
if [ -n "$wheel" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site/mcore" "$wheel" \
    || { echo "[gpu_check] installing $wheel failed" >&2; exit 1; }
fi
export PYTHONPATH=$site/mcore:$site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$repo"

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$status"; }
part() {  # part NAME LIMIT_S NOTE CMD...: run CMD under the remaining budget, record it
  local name=$1 limit=$2 note=$3; shift 3
  local remaining=$((deadline - SECONDS))
  if [ "$remaining" -lt 30 ]; then record "$name" - 0 "skipped: time budget spent"; return; fi
  [ "$limit" -lt "$remaining" ] || limit=$remaining
  echo "=== [gpu_check] $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$work/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && note="timed out after ${limit} s; $note"
  record "$name" "$rc" $((SECONDS - start)) "$note"
}
selm=("$python" -P -m selm_mcore.cli)

"$python" -P -m selm_mcore.bench.gpu_report env "$work/env.json" || exit 1
has() { "$python" -c "import json,sys; sys.exit(0 if json.load(open('$work/env.json'))['has_$1'] else 1)"; }
cuda=0; "$python" -c "import json,sys; sys.exit(0 if json.load(open('$work/env.json'))['cuda_available'] else 1)" && cuda=1
if [ "$cuda" = 0 ] && [ "$dry" = 0 ]; then
  echo "[gpu_check] no CUDA device visible to $python: run on a GPU (or --dry for the CPU check)" >&2
  exit 2
fi
mcore=0; has megatron && mcore=1
spec=$( (has transformer_engine && [ "$cuda" = 1 ]) && echo "Transformer Engine spec" || echo "local spec (no Transformer Engine)")
attn=$( (has flash_attn && [ "$cuda" = 1 ]) && echo "flash-attn" || echo "torch SDPA (no flash-attn)")
gpu=$(sed -n 's/.*"gpu": "\([^"]*\)".*/\1/p' "$work/env.json" | head -1)
record env 0 0 "${gpu:-no GPU}; layers: $spec; packed attention: $attn"

# tests
tests=(tests/kernels/test_triton_gpu.py tests/kernels/test_packed_attention_gpu.py)
[ "$mcore" = 1 ] && tests+=(tests/unit/test_cpu_compat.py tests/dist/test_parity_llama.py)
note=$([ "$mcore" = 1 ] && echo "" || echo "no megatron-core: parity/compat tests not run")
part tests 240 "$note" "$python" -P -m pytest -m gpu -q -p no:cacheprovider \
  --junitxml="$work/pytest.xml" "${tests[@]}"

# kernels
if [ "$dry" = 1 ]; then kargs=(--vocab 4096 2048 --tokens 64 --repeats 1 --methods megatron chunked naive)
else kargs=(--vocab 128256 64128 --tokens 4096 8192 16384 --repeats 10 --methods triton triton_inplace megatron chunked); fi
note=$([ "$mcore" = 1 ] && echo "bf16 logits" || echo "no megatron-core: no Megatron CE column")
part kernels 150 "$note" "$python" -P -m selm_mcore.kernels.bench_logprobs "${kargs[@]}" \
  --csv "" --json "$work/kernels.json"

# training through the trainer's step: planner vs measured
if [ "$dry" = 1 ]; then
  targs=(--set train.global_batch_size=4 --set data.pack_tokens=256 --steps 1 --warmup-steps 1 --threads 1)
else
  targs=(--shape llama3-8b --layers 4 --set model.dtype=bf16 --set data.packing=shared_prompt
         --set data.pack_tokens=8192 --set train.global_batch_size=16 --prompt-tokens 256
         --response-tokens 256 --steps 3 --warmup-steps 1 --threads 8)
fi
if [ "$mcore" = 1 ]; then
  part train_none 150 "$spec; $attn" "${selm[@]}" bench plan-check "${targs[@]}" --json "$work/train_none.json"
  part train_full 150 "$spec; $attn" "${selm[@]}" bench plan-check "${targs[@]}" \
    --set model.recompute=full --json "$work/train_full.json"
else
  record train - 0 "skipped: megatron-core not installed (give --mcore-wheel)"
fi

# the log-prob path inside a training step (selm bench logprob-path)
if [ "$mcore" = 1 ]; then
  if [ "$dry" = 1 ]; then
    "$python" -P -m selm_mcore.testing.assets tiny-llama "$work/tiny" > /dev/null
    largs=(--hf-dir "$work/tiny" --dtype fp32 --seq-length 64 --micro-batch-size 1 --global-batch-size 2 --steps 1 --warmup-steps 1 --threads 1)
  else
    largs=(--layers 4 --dtype bf16 --seq-length 1024 --micro-batch-size 2 --global-batch-size 8 --steps 3 --warmup-steps 1 --threads 8)
  fi
  part logprob 120 "$spec" "${selm[@]}" bench logprob-path "${largs[@]}" --json "$work/logprob.json"
else
  record logprob - 0 "skipped: megatron-core not installed"
fi

# vLLM generation, only where vLLM is installed
if has vllm; then
  [ -d "$work/tiny" ] || "$python" -P -m selm_mcore.testing.assets tiny-llama "$work/tiny" > /dev/null
  part vllm 120 "tiny model" "${selm[@]}" bench generation --backend vllm --set "model.hf_dir=$work/tiny" \
    --set generation.max_model_len=512 --set generation.max_tokens=32 \
    --set generation.kv_cache_memory_gb=0.5 \
    --num-prompts 8 --max-tokens 32 --repeats 1 --threads 4 --workdir "$work/generation" \
    --json "$work/generation.json"
else
  record vllm - 0 "skipped: vLLM not installed"
fi

"$python" -P -m selm_mcore.bench.gpu_report report "$work" "$out" || exit 1
echo "[gpu_check] wrote $out/gpu_check.json and $out/gpu_check.md (parts in $work)"
# exit status 1 when a part that ran failed (the report says which)
! cut -f2 "$status" | grep -qvE '^(0|-)$'
