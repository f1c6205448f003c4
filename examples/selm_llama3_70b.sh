#!/usr/bin/env bash
#SBATCH --job-name=selm-llama3-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=selm-llama3-70b-%j.out
# SELM on Llama-3-70B-Instruct over several nodes: Slurm + torchrun, TP=8 x PP=2 x DP=(nodes/2)
# (memory arithmetic in examples/configs/selm_llama3_70b.yaml; >= 4 nodes of 8 x 80 GB GPUs).
#
#   sbatch examples/selm_llama3_70b.sh [--set section.key=value ...]     # from the repo root
#
# The batch step runs `selm run` on the first node: PairRM and the exports run there; the
# Megatron phases (refpass, train) start one torchrun per node through srun, which rendezvous on
# the first node, and the generate phase one `selm generate` per node (one TP=8 vLLM engine per
# node, each on its slice of the prompts). One task per node gets the node's CPUs
# (--cpus-per-task: adjust to your nodes; srun is told the same, SRUN_CPUS_PER_TASK, since
# Slurm 22.05 no longer passes it from the batch allocation). Every Python process runs as
# `python -P` (PYTHONSAFEPATH=1): the checkout's kernels/ must not shadow selm_mcore.kernels.
# Needs on every node the same paths: this checkout and its Python environment
# (pip install -e '.[gpu,logging,reports,data]' and
# pip install --no-deps llm-blender==0.0.2 dataclasses-json; docs/gpu.md) on a shared filesystem,
# and the
# inputs below already downloaded (run `SELM_DOWNLOADS=... bash examples/selm_llama3_8b.sh`'s
# fetches by hand, with meta-llama/Meta-Llama-3-70B-Instruct, 141 GB). Disk: ~1.5 TB (per
# round a 141 GB export and checkpoint; step checkpoints with optimizer state, ~1.1 TB, are
# pruned after each round). Resubmitting resumes at the first unfinished phase.
set -euo pipefail
repo=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$repo"
downloads=${SELM_DOWNLOADS:-$repo/outputs/downloads}
model=$downloads/Meta-Llama-3-70B-Instruct
uf=$downloads/ultrafeedback_binarized/data
for need in "$model/config.json" "$uf" "$downloads/PairRM/config.json" "$downloads/deberta-v3-large"; do
  if [ ! -e "$need" ]; then echo "[selm] missing $need (see the header of this script)" >&2; exit 1; fi
done

nnodes=${SLURM_NNODES:-1}
cpus=${SLURM_CPUS_PER_TASK:-96}
head_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | sed -n 1p)
# TORCH_NCCL_ASYNC_ERROR_HANDLING is the torch 2.x name (NCCL_ASYNC_ERROR_HANDLING is the old,
# deprecated one): 1 = abort the NCCL communicator and end the process on an NCCL error.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=8
export PYTHONSAFEPATH=1 SRUN_CPUS_PER_TASK=$cpus
echo "[selm] $nnodes node(s), $cpus CPUs per node task, rendezvous on $head_node:29500"
overrides=(--set "online.nnodes=$nnodes" --set "generation.num_engines=$nnodes")
bash examples/check_layout.sh examples/configs/selm_llama3_70b.yaml "$model" "${overrides[@]}" \
  -- "$@"

exec python -P -m selm_mcore.cli run examples/configs/selm_llama3_70b.yaml "${overrides[@]}" \
  --set "online.launcher=srun --nodes=$nnodes --ntasks-per-node=1 --cpus-per-task=$cpus --kill-on-bad-exit=1" \
  --set "online.rdzv_endpoint=$head_node:29500" \
  --set "online.rdzv_id=selm-${SLURM_JOB_ID:-local}" \
  --set "model.hf_dir=$model" \
  --set "data.train_path=$(ls "$uf"/train_prefs-*.parquet | sed -n 1p)" \
  --set "data.eval_prompts_path=$(ls "$uf"/test_prefs-*.parquet | sed -n 1p)" \
  --set "ranking.model_path=$downloads/PairRM" \
  --set "ranking.backbone=$downloads/deberta-v3-large" \
  "$@"
