#!/usr/bin/env bash
#SBATCH --job-name=sft_distill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# Distillation SFT. RECIPE (default sft_distill_ling_lite) and SFT_ARGS (extra `megatron-ring sft` flags)
# come from the environment; e.g. on a CPU box without Slurm:
#   RECIPE=sft_distill_tiny NPROC=2 SFT_ARGS="--ep 2 --max-steps 50" bash slurm/sft_distill.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # under sbatch the script runs from Slurm's spool copy:
[ -f "$HERE/launch.sh" ] || HERE="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm"  # then the repo is where it was submitted
source "$HERE/launch.sh"
mkdir -p logs
run_stage sft --recipe "${RECIPE:-sft_distill_ling_lite}" ${SFT_ARGS:-}
