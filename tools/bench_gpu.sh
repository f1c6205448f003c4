#!/usr/bin/env bash
# GPU benchmark, one command, about 1-2 minutes on one H100/H200 (hard limit 290 s):
# DPO training steps of a Llama-3-8B-shaped model (its hidden size, heads, GQA groups, MLP width
# and 128,256-token vocabulary; random weights; 8 of its 32 layers by default so that bf16
# weights + grads + AdamW states + activations fit one 80 GB GPU) in bf16 at TP1, once with the
# fused Triton log-prob kernel (selm_mcore.kernels) and once with Megatron's
# vocab_parallel_cross_entropy: step time, tokens/s, TFLOP/s, MFU (vs 989 TFLOP/s dense bf16),
# peak allocated memory. Table on stdout, JSON in outputs/bench/gpu_logprob_path.json.
#
#   bash tools/bench_gpu.sh
#   LAYERS=4 SEQ=2048 MBS=1 GBS=4 bash tools/bench_gpu.sh
#
# Needs a CUDA environment with selm_mcore installed (pip install -e '.[gpu]'); PYTHON picks its
# interpreter (default python3). Without a CUDA device it says so and exits 0 (skipped).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[bench_gpu] skipped: no CUDA device visible to $python (set PYTHON to a CUDA environment)"
  exit 0
fi
cd "$repo"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 290 "$python" -m selm_mcore.cli bench logprob-path --dtype bf16 \
  --layers "${LAYERS:-8}" --seq-length "${SEQ:-1024}" \
  --micro-batch-size "${MBS:-2}" --global-batch-size "${GBS:-8}" \
  --steps "${STEPS:-5}" --warmup-steps 2 \
  --json "${OUT:-outputs/bench/gpu_logprob_path.json}"
