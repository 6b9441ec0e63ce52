#!/usr/bin/env bash
#SBATCH --job-name=rl_stage1
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# C3PO RL stage 1 (math). The headline use: `sbatch slurm/rl_stage1.sh`.
#   RECIPE    rl_stage1_ling_lite (default) | rl_stage1_tiny (CPU, in-process rollouts) | any recipe/YAML
#   RL_ARGS   extra `megatron-ring rl` flags (e.g. "--steps 20 --max-steps 10")
#   ROLLOUT_GPUS  GPUs per node given to SGLang servers when the recipe's engine is sglang (default 4); the
#             trainer ranks take the others. The servers start from the stage's start checkpoint exported
#             to HF and receive the policy's weights after every step.
# Without Slurm it runs locally, e.g. the README main job: RECIPE=rl_stage1_tiny bash slurm/rl_stage1.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # under sbatch the script runs from Slurm's spool copy:
[ -f "$HERE/launch.sh" ] || HERE="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm"  # then the repo is where it was submitted
source "$HERE/launch.sh"
mkdir -p logs
export RECIPE=${RECIPE:-rl_stage1_ling_lite}
run_rl_stage ${RL_ARGS:-}
