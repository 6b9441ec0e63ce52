#!/usr/bin/env bash
# with_gpus.sh FIRST COUNT command...: run the command on GPUs FIRST..FIRST+COUNT-1 of this node's GPUs, counted in
# the list Slurm bound to the step (CUDA_VISIBLE_DEVICES from GRES), else the machine's 0..N-1. Runs on each node
# (under srun), so every node slices its own binding: the trainer takes the first GPUs, the rollout server the rest.
set -euo pipefail
first=$1 count=$2; shift 2
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a all <<< "$CUDA_VISIBLE_DEVICES"
else
  n=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)
  all=(); for ((i = 0; i < n; i++)); do all+=("$i"); done
fi
if [ $((first + count)) -gt ${#all[@]} ]; then
  echo "with_gpus.sh: GPUs $first..$((first + count - 1)) asked, this node has ${#all[@]} (${all[*]:-none})" >&2
  exit 2
fi
export CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${all[*]:first:count}")
exec "$@"
