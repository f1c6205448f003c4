#!/usr/bin/env bash
# Stops an example before it downloads or starts anything when `selm plan` predicts that its
# layout does not fit the GPUs here (the examples call it first):
#
#   bash examples/check_layout.sh CONFIG MODEL [selm plan args ...] -- [the example's args ...]
#
# GPU memory: SELM_GPU_MEM_GIB, else the first GPU's as nvidia-smi reports it, else 80 GiB. The
# example's `--set section.key=value` arguments are passed on, so an override is checked too.
set -euo pipefail
config=$1 model=$2
shift 2
plan_args=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do plan_args+=("$1"); shift; done
if [ $# -gt 0 ]; then shift; fi
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sed -n 1p || true)
gpu_mem=${SELM_GPU_MEM_GIB:-$(( ${mib:-81920} / 1024 ))}
sets=()
args=("$@")
for ((i = 0; i + 1 < ${#args[@]}; i++)); do
  if [ "${args[i]}" = --set ]; then sets+=(--set "${args[i + 1]}"); fi
done
exec python -P -m selm_mcore.cli plan --check "$config" --model "$model" --gpu-mem "$gpu_mem" \
  ${plan_args[@]+"${plan_args[@]}"} ${sets[@]+"${sets[@]}"}
