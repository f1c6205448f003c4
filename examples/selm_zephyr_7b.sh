#!/usr/bin/env bash
# SELM on Zephyr (HuggingFaceH4/mistral-7b-sft-beta): one offline DPO warm-up round and 3 SELM
# rounds on UltraFeedback-binarized quarters with PairRM, one node of 8 x 80 GB GPUs, the
# reference hyper-parameters (examples/configs/selm_zephyr_7b.yaml).
#
#   bash examples/selm_zephyr_7b.sh [--set section.key=value ...]
#
# Needs: the GPU environment (pip install -e '.[gpu,logging,reports,data]' and
# pip install --no-deps llm-blender==0.0.2 dataclasses-json: vLLM, tensorboard, the report plots,
# Parquet and PairRM; Transformer Engine / flash-attn optional, see docs/gpu.md), ~17 GB of
# downloads (no gated model) and ~250 GB of disk for the run (per round: a 14.5 GB HF export, a
# 14.5 GB trained checkpoint and, while training, a ~90 GB step checkpoint with optimizer state,
# pruned after the round). Set SELM_DOWNLOADS to keep the downloads elsewhere; folders already
# there are not fetched. Rerunning resumes the run at its first unfinished phase.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
downloads=${SELM_DOWNLOADS:-$repo/outputs/downloads}
source examples/fetch.sh   # fetch REPO_ID LOCAL_DIR [hf download args...]: download once

echo "[selm] needs: 8 GPUs x 80 GB, the GPU environment"
# Stop before downloading anything if the layout is predicted not to fit these GPUs.
bash examples/check_layout.sh examples/configs/selm_zephyr_7b.yaml \
  HuggingFaceH4/mistral-7b-sft-beta -- "$@"
fetch HuggingFaceH4/mistral-7b-sft-beta "$downloads/mistral-7b-sft-beta" \
  --exclude "*.bin" "*.pt"                                   # 14.5 GB safetensors + tokenizer
fetch HuggingFaceH4/ultrafeedback_binarized "$downloads/ultrafeedback_binarized" \
  --repo-type dataset --include "data/train_prefs-*" "data/test_prefs-*"   # ~0.3 GB parquet
fetch llm-blender/PairRM "$downloads/PairRM"                 # 1.7 GB ranker
fetch microsoft/deberta-v3-large "$downloads/deberta-v3-large"   # PairRM's backbone (tokenizer)

uf=$downloads/ultrafeedback_binarized/data
exec python -P -m selm_mcore.cli run examples/configs/selm_zephyr_7b.yaml \
  --set "model.hf_dir=$downloads/mistral-7b-sft-beta" \
  --set "data.train_path=$(ls "$uf"/train_prefs-*.parquet | sed -n 1p)" \
  --set "data.eval_prompts_path=$(ls "$uf"/test_prefs-*.parquet | sed -n 1p)" \
  --set "ranking.model_path=$downloads/PairRM" \
  --set "ranking.backbone=$downloads/deberta-v3-large" \
  "$@"
