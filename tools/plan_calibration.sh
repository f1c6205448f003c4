#!/usr/bin/env bash
# The layout planner against measured CPU runs (docs/plan.md, "Checked against measured runs"):
# `selm bench plan-check` on the tiny Llama and SmolLM2-135M-Instruct at TP1 / TP2 (TP3 for
# SmolLM2, whose 9 heads admit no TP2) / PP2 / DP2 over gloo, recompute none and full, fp32 and
# bf16, each packing. One JSON per run in OUT (default outputs/plan_calibration), then a markdown
# table of measured / predicted on stdout. About 10 minutes on 2 cores.
#
#   bash tools/plan_calibration.sh [OUT]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=${1:-outputs/plan_calibration}
mkdir -p "$out"
python=${PYTHON:-$repo/.venv/bin/python}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
smol=$("$python" -P -m selm_mcore.testing.assets smollm2 | tail -1)
common=(--threads 1 --set train.global_batch_size=8 --set data.pack_tokens=512)
run() {  # run NAME NPROC ARGS...: one plan-check run
  local name=$1 nproc=$2; shift 2
  echo "[plan_calibration] $name"
  "$python" -P -m selm_mcore.cli bench plan-check "${common[@]}" --nproc "$nproc" "$@" \
    --json "$out/$name.json" > "$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; exit 1; }
}
run tiny_tp1 1
run tiny_tp1_full 1 --set model.recompute=true
run tiny_tp1_bf16 1 --set model.dtype=bf16
run tiny_tp1_none 1 --set data.packing=none --set train.micro_batch_size=2
run tiny_tp1_pack 1 --set data.packing=pack
run tiny_tp2 2 --set parallel.tp=2
run tiny_tp2_full 2 --set parallel.tp=2 --set model.recompute=true
run tiny_pp2 2 --set parallel.pp=2
run tiny_pp2_vpp2 2 --set parallel.pp=2 --set parallel.vpp=2
run tiny_dp2 2
run smol_tp1 1 --hf-dir "$smol"
run smol_tp1_full 1 --hf-dir "$smol" --set model.recompute=true
run smol_tp1_bf16 1 --hf-dir "$smol" --set model.dtype=bf16
run smol_tp3 3 --hf-dir "$smol" --set parallel.tp=3
run smol_pp2 2 --hf-dir "$smol" --set parallel.pp=2
run smol_dp2 2 --hf-dir "$smol"
"$python" -P -m selm_mcore.cli bench plan-check --summarize "$out"/*.json
