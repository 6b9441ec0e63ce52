#!/usr/bin/env bash
#SBATCH --job-name=select_ckpt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --mem=128G
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
# Entropy-based selection over an SFT run's checkpoints; writes RUN/selection/* and RUN/checkpoints/selected.
#   RUN=runs/tiny/sft PROMPTS=runs/tiny/data/rl_stage1/4_filtered.parquet TOKENIZER=runs/tiny/hf_init \
#   EVAL=runs/tiny/data/eval/math.parquet bash slurm/select_ckpt.sh
# On a GPU allocation the checkpoints' samples come from an SGLang server of the job (SGLANG_PYTHON, TP = the
# node's GPUs, context MAX_PROMPT_TOKENS + MAX_NEW_TOKENS), loaded with each checkpoint's export in turn.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # under sbatch the script runs from Slurm's spool copy:
[ -f "$HERE/launch.sh" ] || HERE="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm"  # then the repo is where it was submitted
source "$HERE/launch.sh"
mkdir -p logs
args=(select --run "${RUN:?set RUN}" --prompts "${PROMPTS:?set PROMPTS}" --tokenizer "${TOKENIZER:?set TOKENIZER}"
      --window "${WINDOW_LO:-0.3}" "${WINDOW_HI:-0.5}")
[ -n "${EVAL:-}" ] && args+=(--eval "$EVAL")
if [ "$(gpus_per_node)" -gt 0 ]; then  # on GPUs: the samples (entropy, accuracy) from an SGLang server of the job,
  rm -rf "$RUN/selection/server_init.hf"  # started on the run's latest checkpoint, each checkpoint loaded in turn
  "$PY" -m megatron_ring.cli export --ckpt "$RUN" --out "$RUN/selection/server_init.hf" --tokenizer "$TOKENIZER" \
    --dtype bf16
  job_server "$RUN/selection/server_init.hf" $((${MAX_PROMPT_TOKENS:-2048} + ${MAX_NEW_TOKENS:-32768}))
  rm -rf "$RUN/selection/server_init.hf"  # (loaded: every checkpoint's own export follows)
  args+=(--sglang-urls "$SERVER_URL")
fi
"$PY" -m megatron_ring.cli "${args[@]}" ${SELECT_ARGS:-}
