#!/usr/bin/env bash
#SBATCH --job-name=export
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
# A training checkpoint or run dir (CKPT) -> a servable HF folder (OUT); TOKENIZER and DTYPE optional.
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$REPO/slurm/launch.sh" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
"$PY" -m megatron_ring.cli export --ckpt "${CKPT:?set CKPT}" --out "${OUT:?set OUT}" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"} ${DTYPE:+--dtype "$DTYPE"}
