#!/usr/bin/env bash
#SBATCH --job-name=preflight
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=00:15:00
#SBATCH --output=logs/%x-%j.out
# Before a long run, on the nodes it gets (`megatron-ring preflight` on every rank, launched as every stage is): each
# node launches once, each rank's step can open the GPUs Slurm bound (cgroup ConstrainDevices), and rank 0's
# weight-sync address answers from every node. One table; exit 1 on a problem.
#   PREFLIGHT_ARGS  e.g. "--out preflight.json --hold 60"
#   NPROC           ranks per node (default: one per GPU)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ -f "$HERE/launch.sh" ] || HERE="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm"
source "$HERE/launch.sh"
mkdir -p logs
export MEGATRON_RING_SYNC_PORT; MEGATRON_RING_SYNC_PORT=$(sync_port)
# this shell's own step first: where the stage scripts check CUDA (under submitit, submitit's step)
if [ "${PRINT_PLAN:-0}" != 1 ]; then
  SLURM_GPUS_ON_NODE=$(gpus_per_node) \
    "$PY" -m megatron_ring.cli preflight --here || exit 1
fi
NO_CUDA_CHECK=1 run_stage preflight ${PREFLIGHT_ARGS:-}
