#!/usr/bin/env bash
# The GPU check: one command, at most ~8 minutes (budget 470 s, a time cap per part) on one
# H100/H200. Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (selm_mcore/bench/gpu_report.py);
# everything else goes to stdout.
#
#   bash tools/gpu_check.sh OUTDIR [--mcore-wheel megatron_core-0.16.1-...whl] [--parts a,b,...]
#   bash tools/gpu_check.sh --dry OUTDIR      # every part at tiny sizes on CPU (the CI test;
#                                             # budget 1500 s there)
#
# Needs: python3 (PYTHON) with torch (a CUDA build), triton, numpy, pytest, pyyaml,
# transformers, safetensors. Optional, each used by the parts named: megatron-core 0.16.1
# (--mcore-wheel, $MCORE_WHEEL or .whl/megatron_core-*.whl in the checkout, installed with pip
# --target into a scratch folder: host_syncs, train_*, logprob, the kernel table's Megatron
# column, the parity tests), llm-blender (ranker through llm-blender's own classes; without it
# through transformers' DebertaV2), vLLM (vllm), Transformer Engine and flash-attn (used when
# importable; without them the layers use Megatron's local spec and stock torch attention).
# Every part probes what it imports and, when something is missing, is recorded as skipped with
# the reason while the others run. Parts, in order (time cap, s):
#   env         versions; which packages import (a real import each)
#   attention   selm bench attention: packed varlen attention vs the dense masked reference,
#               max error and time, forward and forward+backward, bf16                   (40)
#   host_syncs  selm bench host-syncs: host syncs per training step                     (40)
#   train_none  selm bench plan-check: the stock-torch Llama-3-8B-width 4-layer packed step
#               (bf16, shared_prompt, distributed optimizer, no recompute): tokens/s,
#               MFU, peak memory next to the planner's                                  (80)
#   ranker      selm bench ranker: a DeBERTa-v3-large-shaped PairRM, random weights, fp16,
#               pairs/s per GPU                                                         (60)
#   kernels     selm_mcore.kernels.bench_logprobs: Triton vs Megatron's cross entropy  (60)
#   train_full  as train_none with model.recompute=full                                 (60)
#   logprob     selm bench logprob-path: a training step, fused kernel vs Megatron CE  (40)
#   tests       pytest -m gpu (the compiled kernels, packed attention, parity)         (90)
#   vllm        selm bench generation on a tiny model, only when vLLM imports           (60)
# A part that fails does not stop the others; the exit status is 1 when one failed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: bash tools/gpu_check.sh [--dry] [--mcore-wheel WHEEL] [--parts a,b,...] OUTDIR"
dry=0
out=""
parts_wanted=""
wheel=${MCORE_WHEEL:-}
while [ $# -gt 0 ]; do
  case $1 in
    --dry) dry=1 ;;
    --mcore-wheel) wheel=$2; shift ;;
    --parts) parts_wanted=",$2,"; shift ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "$usage" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ "$dry" = 1 ] && [ -x "$repo/.venv/bin/python" ]; then python=${PYTHON:-$repo/.venv/bin/python}
else python=${PYTHON:-python3}; fi
work=${GPU_CHECK_WORK:-$(mktemp -d /tmp/selm-gpu-check.XXXXXX)}
mkdir -p "$work"
budget=${GPU_CHECK_BUDGET_S:-470}
[ "$dry" = 1 ] && budget=${GPU_CHECK_BUDGET_S:-1500}  # tiny sizes, but a slow shared CPU
deadline=$((SECONDS + budget))
status=$work/status.tsv
: > "$status"
echo "[gpu_check] needs: $python with torch (CUDA), triton, numpy, pytest, pyyaml, transformers," \
  "safetensors; optional: megatron-core wheel (--mcore-wheel), llm-blender, vLLM, TE, flash-attn"

# selm_mcore importable from this checkout without installing it (kernels/ is selm_mcore.kernels)
site=$work/site
rm -rf "$site/selm_mcore" && mkdir -p "$site/selm_mcore"
for entry in "$repo"/selm_mcore/*; do ln -s "$entry" "$site/selm_mcore/"; done
ln -s "$repo/kernels" "$site/selm_mcore/kernels"
if [ -z "$wheel" ]; then wheel=$(ls "$repo"/.whl/megatron_core-*.whl 2>/dev/null | sed -n 1p); fi
if [ -n "$wheel" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site/mcore" "$wheel" \
    || echo "[gpu_check] installing $wheel failed: the parts that need megatron-core will skip" >&2
fi
export PYTHONPATH=$site/mcore:$site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$repo"

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$status"; }
wanted() { [ -z "$parts_wanted" ] || [[ "$parts_wanted" == *",$1,"* ]]; }
part() {  # part NAME LIMIT_S NOTE CMD...: run CMD under the remaining budget, record it
  local name=$1 limit=$2 note=$3; shift 3
  [ "$dry" = 1 ] && limit=$((limit * 4))  # the caps are for the GPU; a shared CPU is slower
  local remaining=$((deadline - SECONDS))
  if [ "$remaining" -lt 20 ]; then record "$name" - 0 "skipped: time budget spent"; return; fi
  [ "$limit" -lt "$remaining" ] || limit=$remaining
  echo "=== [gpu_check] $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$work/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && note="timed out after ${limit} s; $note"
  record "$name" "$rc" $((SECONDS - start)) "$note"
}
# importable MODULE: whether it imported in the env probe; missing PART MODULE...: record PART
# as skipped naming the first module that does not import (status 0 = something is missing)
importable() {
  "$python" -c "import json,sys; sys.exit(0 if json.load(open('$work/env.json'))['importable']['$1'] else 1)"
}
missing() {
  local name=$1; shift
  for module in "$@"; do
    if ! importable "$module"; then
      local why
      why=$("$python" -c "import json; print(json.load(open('$work/env.json'))['import_errors']['$module'])")
      record "$name" - 0 "skipped: needs $module ($why)"
      echo "[gpu_check] $name skipped: needs $module ($why)"
      return 0
    fi
  done
  return 1
}
selm=("$python" -P -m selm_mcore.cli)
bench_available() {  # a `selm bench` mode of this checkout, or record the part as skipped
  "${selm[@]}" bench "$2" --help > /dev/null 2>&1 && return 0
  record "$1" - 0 "skipped: selm bench $2 not available"; echo "[gpu_check] selm bench $2 not available"
  return 1
}

"$python" -P -m selm_mcore.bench.gpu_report env "$work/env.json" \
  || { echo "[gpu_check] $python -m selm_mcore.bench.gpu_report env failed (is torch installed?)" >&2; exit 1; }
cuda=0; "$python" -c "import json,sys; sys.exit(0 if json.load(open('$work/env.json'))['cuda_available'] else 1)" && cuda=1
if [ "$cuda" = 0 ] && [ "$dry" = 0 ]; then
  echo "[gpu_check] no CUDA device visible to $python: run on a GPU (or --dry for the CPU check)" >&2
  exit 2
fi
mcore=0; importable megatron.core && mcore=1
spec=$( (importable transformer_engine && [ "$cuda" = 1 ]) && echo "Transformer Engine spec" || echo "local spec (no Transformer Engine)")
attn=$( (importable flash_attn && [ "$cuda" = 1 ]) && echo "flash-attn" || echo "stock torch attention (no flash-attn)")
gpu=$(sed -n 's/.*"gpu": "\([^"]*\)".*/\1/p' "$work/env.json" | sed -n 1p)
absent=$("$python" -c "import json; e=json.load(open('$work/env.json'))['importable']; print(', '.join(m for m, ok in e.items() if not ok) or 'none')")
record env 0 0 "${gpu:-no GPU}; layers: $spec; packed attention: $attn; not importable: $absent"

if wanted attention && bench_available attention attention; then
  part attention 40 "$attn" "${selm[@]}" bench attention --json "$work/attention.json"
fi
if wanted host_syncs && bench_available host_syncs host-syncs && ! missing host_syncs megatron.core; then
  part host_syncs 40 "$spec" "${selm[@]}" bench host-syncs --json "$work/host_syncs.json"
fi

# training through the trainer's step: planner vs measured (the stock-torch 8B-width step)
if [ "$dry" = 1 ]; then
  targs=(--set train.global_batch_size=4 --set data.pack_tokens=256 --steps 1 --warmup-steps 1 --threads 1)
else
  targs=(--shape llama3-8b --layers 4 --set model.dtype=bf16 --set data.packing=shared_prompt
         --set data.pack_tokens=8192 --set train.global_batch_size=16 --prompt-tokens 256
         --response-tokens 256 --steps 3 --warmup-steps 1 --threads 8)
fi
if wanted train_none && ! missing train_none megatron.core transformers; then
  part train_none 80 "$spec; $attn" "${selm[@]}" bench plan-check "${targs[@]}" --json "$work/train_none.json"
fi

if wanted ranker && ! missing ranker transformers; then
  if [ "$dry" = 1 ]; then
    rargs=(--shape tiny --prompts 8 --batch-size 4 --source-tokens 24 --candidate-tokens 32 --repeats 1 --threads 1)
  else
    rargs=(--prompts 64 --batch-size 32 --repeats 2 --threads 8)
  fi
  via=$(importable llm_blender && echo "llm-blender and transformers" || echo "transformers only (no llm-blender)")
  part ranker 60 "$via" "${selm[@]}" bench ranker --impl both "${rargs[@]}" --json "$work/ranker.json"
fi

if wanted kernels && ! missing kernels torch; then
  if [ "$dry" = 1 ]; then kargs=(--vocab 4096 2048 --tokens 64 --repeats 1); methods=(chunked naive)
  else kargs=(--vocab 128256 64128 --tokens 4096 8192 16384 --repeats 10); methods=(chunked)
    importable triton && methods=(triton triton_inplace chunked); fi
  [ "$mcore" = 1 ] && methods=(megatron "${methods[@]}")
  note=$([ "$mcore" = 1 ] && echo "bf16 logits" || echo "no megatron-core: no Megatron CE column")
  part kernels 60 "$note" "$python" -P -m selm_mcore.kernels.bench_logprobs "${kargs[@]}" \
    --methods "${methods[@]}" --csv "" --json "$work/kernels.json"
fi

if wanted train_full && ! missing train_full megatron.core transformers; then
  part train_full 60 "$spec; $attn" "${selm[@]}" bench plan-check "${targs[@]}" \
    --set model.recompute=full --json "$work/train_full.json"
fi

# the log-prob path inside a training step (selm bench logprob-path)
if wanted logprob && ! missing logprob megatron.core transformers; then
  if [ "$dry" = 1 ]; then
    "$python" -P -m selm_mcore.testing.assets tiny-llama "$work/tiny" > /dev/null
    largs=(--hf-dir "$work/tiny" --dtype fp32 --seq-length 64 --micro-batch-size 1 --global-batch-size 2 --steps 1 --warmup-steps 1 --threads 1)
  else
    largs=(--layers 4 --dtype bf16 --seq-length 1024 --micro-batch-size 2 --global-batch-size 8 --steps 3 --warmup-steps 1 --threads 8)
  fi
  part logprob 40 "$spec" "${selm[@]}" bench logprob-path "${largs[@]}" --json "$work/logprob.json"
fi

if wanted tests && ! missing tests pytest; then
  tests=(tests/kernels/test_triton_gpu.py tests/kernels/test_packed_attention_gpu.py)
  [ "$mcore" = 1 ] && tests+=(tests/unit/test_cpu_compat.py tests/dist/test_parity_llama.py)
  note=$([ "$mcore" = 1 ] && echo "" || echo "no megatron-core: parity/compat tests not run")
  part tests 90 "$note" "$python" -P -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$work/pytest.xml" "${tests[@]}"
fi

# vLLM generation, only where vLLM is installed
if wanted vllm && ! missing vllm vllm; then
  [ -d "$work/tiny" ] || "$python" -P -m selm_mcore.testing.assets tiny-llama "$work/tiny" > /dev/null
  part vllm 60 "tiny model" "${selm[@]}" bench generation --backend vllm --set "model.hf_dir=$work/tiny" \
    --set generation.max_model_len=512 --set generation.max_tokens=32 \
    --set generation.kv_cache_memory_gb=0.5 \
    --num-prompts 8 --max-tokens 32 --repeats 1 --threads 4 --workdir "$work/generation" \
    --json "$work/generation.json"
fi

"$python" -P -m selm_mcore.bench.gpu_report report "$work" "$out" || exit 1
echo "[gpu_check] wrote $out/gpu_check.json and $out/gpu_check.md (parts in $work)"
# exit status 1 when a part that ran failed (the report says which)
! cut -f2 "$status" | grep -qvE '^(0|-)$'
