#!/usr/bin/env bash
#SBATCH --job-name=data
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
# Data curation + the base model for the embedded default: RUN (default runs/tiny) gets data/ (every data_tools
# step), hf_init/ (a random tiny MoE + tokenizer) and mcore/ (its megatron checkpoint). Skips what exists.
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$REPO/slurm/launch.sh" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
RUN=${RUN:-runs/tiny}
mkdir -p "$RUN" logs
[ -f "$RUN/data/summary.json" ] || "$PY" -m data_tools default "$RUN/data"
[ -f "$RUN/mcore/megatron_ring.json" ] || {
  "$PY" -m megatron_ring.cli init --recipe "${BASE_RECIPE:-tiny}" --out "$RUN/hf_init"
  "$PY" -m megatron_ring.cli convert hf-to-mcore --hf "$RUN/hf_init" --out "$RUN/mcore"; }
echo "data + base model ready in $RUN"
