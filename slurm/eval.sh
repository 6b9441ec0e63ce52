#!/usr/bin/env bash
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
# Evaluate a checkpoint at the paper's protocol (k samples at T=1.0, top-p 0.95; avg@k and pass@k; the Table 1 layout):
# export it (CKPT: a training checkpoint or run dir -> EXPORT, default <run>/export) or take MODEL (an exported HF
# folder), serve it for the run (SGLang over all GPUs when present, else the CPU server), grade, write OUT/results.md.
#   LABEL       the table column (default: the run dir's name)       OUT     results folder (default runs/eval)
#   BENCHMARKS  default "aime24 aime25 humaneval"; others need files: FILES="math500=m.jsonl gpqa_diamond=g.parquet"
#   K           samples per problem (default 32, the paper's AIME@32)  MAX_TOKENS (default 32768)
#   EVAL_ARGS   more `megatron-ring eval` flags (--temperature, --limit, --concurrency, --data-dir ...)
# e.g. locally on the tiny model: CKPT=runs/tiny/rl_stage1 BENCHMARKS="heldout_math aime24" K=4 MAX_TOKENS=192 \
#      EVAL_ARGS="--data-dir runs/tiny/data/eval" bash slurm/eval.sh
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$REPO/slurm/launch.sh" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}  # under sbatch: Slurm's spool copy
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
mkdir -p logs
if [ -z "${MODEL:-}" ]; then
  CKPT=${CKPT:?set CKPT (a checkpoint or run dir) or MODEL (an exported HF folder)}
  base=$CKPT; [ -d "$CKPT/checkpoints" ] || base=$(dirname "$(dirname "$CKPT")")
  MODEL=${EXPORT:-$base/export}
  LABEL=${LABEL:-$(basename "$base")}
  "$PY" -m megatron_ring.cli export --ckpt "$CKPT" --out "$MODEL" ${TOKENIZER:+--tokenizer "$TOKENIZER"}
fi
files=(); for f in ${FILES:-}; do files+=(--file "$f"); done
read -r -a benches <<< "${BENCHMARKS:-aime24 aime25 humaneval}"
"$PY" -m megatron_ring.cli eval --serve "$MODEL" --label "${LABEL:-$(basename "$MODEL")}" --benchmarks "${benches[@]}" \
  --k "${K:-32}" --max-tokens "${MAX_TOKENS:-32768}" --out "${OUT:-runs/eval}" "${files[@]}" ${EVAL_ARGS:-}
