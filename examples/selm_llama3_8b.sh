#!/usr/bin/env bash
# SELM on Llama-3-8B-Instruct: 3 rounds on UltraFeedback-binarized with PairRM, one node of
# 8 x 80 GB GPUs, the reference hyper-parameters (examples/configs/selm_llama3_8b.yaml).
#
#   bash examples/selm_llama3_8b.sh [--set section.key=value ...]
#
# Needs: the GPU environment (pip install -e '.[gpu,logging,reports,data]' and
# pip install --no-deps llm-blender==0.0.2 dataclasses-json: vLLM, tensorboard, the report plots,
# Parquet and PairRM; Transformer Engine / flash-attn optional, see docs/gpu.md), a Hugging Face
# token with access
# to the gated meta-llama/Meta-Llama-3-8B-Instruct (`hf auth login`), ~60 GB of downloads and
# ~250 GB of disk for the run (per round: a 16 GB HF export, a 16 GB trained checkpoint and,
# while training, a ~100 GB step checkpoint with optimizer state, pruned after the round).
# Set SELM_DOWNLOADS to keep the downloads elsewhere; folders already there are not fetched.
# Rerunning resumes the run at its first unfinished phase.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
downloads=${SELM_DOWNLOADS:-$repo/outputs/downloads}
source examples/fetch.sh   # fetch REPO_ID LOCAL_DIR [hf download args...]: download once

echo "[selm] needs: 8 GPUs x 80 GB, the GPU environment, access to meta-llama (gated)"
# Stop before downloading anything if the layout is predicted not to fit these GPUs.
bash examples/check_layout.sh examples/configs/selm_llama3_8b.yaml \
  meta-llama/Meta-Llama-3-8B-Instruct -- "$@"
fetch meta-llama/Meta-Llama-3-8B-Instruct "$downloads/Meta-Llama-3-8B-Instruct" \
  --exclude "original/*"                                     # 16 GB safetensors + tokenizer
fetch HuggingFaceH4/ultrafeedback_binarized "$downloads/ultrafeedback_binarized" \
  --repo-type dataset --include "data/train_prefs-*" "data/test_prefs-*"   # ~0.3 GB parquet
fetch llm-blender/PairRM "$downloads/PairRM"                 # 1.7 GB ranker
fetch microsoft/deberta-v3-large "$downloads/deberta-v3-large"   # PairRM's backbone (tokenizer)

uf=$downloads/ultrafeedback_binarized/data
exec python -P -m selm_mcore.cli run examples/configs/selm_llama3_8b.yaml \
  --set "model.hf_dir=$downloads/Meta-Llama-3-8B-Instruct" \
  --set "data.train_path=$(ls "$uf"/train_prefs-*.parquet | head -1)" \
  --set "data.eval_prompts_path=$(ls "$uf"/test_prefs-*.parquet | head -1)" \
  --set "ranking.model_path=$downloads/PairRM" \
  --set "ranking.backbone=$downloads/deberta-v3-large" \
  "$@"
