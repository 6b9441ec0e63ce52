#!/usr/bin/env bash
# The whole recipe as chained Slurm jobs (each starts only if the one before succeeded: --dependency=afterok):
#   data -> SFT -> select -> RL stage 1 -> difficulty -> RL stage 2 -> export -> eval (the selected SFT checkpoint,
#   then the final model, into one table: $RUN/eval/results.md)
# difficulty: stage 1's policy samples K answers per stage-2 prompt and only the prompts it sometimes solves go on
# to stage 2 (slurm/difficulty.sh). On by default for the tiny recipes; DIFFICULTY=0 skips it (stage 2 then takes
# the data stage's prompts), as it does by default for Ling-lite, whose rollouts would need SGLang (not wired).
# Run it on the login node: `bash slurm/pipeline.sh`. Defaults: the tiny recipes on a CPU cluster (RUN=runs/tiny);
# for Ling-lite set SIZE=ling_lite and the GPU sbatch defaults of each script apply (SBATCH_EXTRA to add flags);
# it then needs the real model and data, never the tiny ones: BASE (the base model's megatron checkpoint: `megatron-ring
# convert hf-to-mcore` of Ling-lite), TOKENIZER (its HF tokenizer folder) and DATA (a data folder laid out as the
# data stage's, built with that tokenizer and the recipe's sequence length); the data stage is then skipped.
# DRY_RUN=1 prints the sbatch commands instead of submitting. Every stage script also runs without Slurm.
# SUBMITIT=1 submits the same jobs through megatron_ring.launch (submitit; local processes where no cluster answers,
# or with SUBMITIT_LOCAL=1).
# FROM=STAGE (data sft select rl_stage1 difficulty rl_stage2 export eval_sft eval_final) submits that stage and the
# ones after it, reusing what the earlier stages left in $RUN (e.g. FROM=rl_stage1 after changing an RL setting).
# QUICK=1 (tiny only): every stage with fewer steps and samples, as `scripts/main.sh --quick` (a first look, or the
# launcher parity check scripts/pipeline_parity.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE=${SIZE:-tiny}
RUN=${RUN:-runs/$SIZE}  # every stage writes under it: e.g. RUN=$SCRATCH/ring-lite keeps checkpoints off the checkout
if [ "$SIZE" = tiny ]; then  # the CPU overrides of the GPU-node #SBATCH defaults (no whole node, no GPU)
  RES=(--nodes=1 --gpus-per-node=0 --cpus-per-task="${CPUS:-2}" --mem="${MEM:-16G}" --oversubscribe --time=04:00:00)
  NP=(NPROC="${NPROC:-1}")  # CPU ranks per node
else  # GPU nodes: each script's #SBATCH lines (whole nodes), one rank per GPU unless NPROC says otherwise
  RES=()
  NP=(); [ -n "${NPROC:-}" ] && NP=(NPROC="$NPROC")
fi
if [ "$SIZE" = tiny ]; then  # the data stage builds them all
  D=$RUN/data BASE_CKPT=$RUN/mcore TOK=$RUN/data/tokenizer
else
  for v in BASE TOKENIZER DATA; do
    [ -n "${!v:-}" ] || { echo "SIZE=$SIZE needs $v=...: the tiny data, model and tokenizer do not fit the" \
      "$SIZE recipes (BASE: the base model converted with megatron-ring convert hf-to-mcore; TOKENIZER: its HF" \
      "tokenizer; DATA: a data folder laid out as data_tools writes it, built with that tokenizer)" >&2; exit 2; }
  done
  D=$DATA BASE_CKPT=$BASE TOK=$TOKENIZER
fi
read -r -a EXTRA <<< "${SBATCH_EXTRA:-}"
prev=""
STAGES=(data sft select rl_stage1 difficulty rl_stage2 export eval_sft eval_final)
if [ "$SIZE" = tiny ]; then DIFFICULTY=${DIFFICULTY:-1}; else DIFFICULTY=${DIFFICULTY:-0}; fi
FROM=${FROM:-data}
Q_SFT="" Q_SEL="--limit 100 --max-new-tokens 192" Q_RL="" Q_DIFF=() Q_EVAL=()
if [ "${QUICK:-0}" = 1 ]; then
  [ "$SIZE" = tiny ] || { echo "QUICK=1 is for the tiny recipes (SIZE=$SIZE)" >&2; exit 2; }
  Q_SFT=" --max-steps 160 --save-interval 40 --log-interval 20" Q_SEL="--limit 16 --max-new-tokens 64"
  Q_RL=" --steps 4 --prompts-per-step 8 --eval-limit 24 --eval-interval 0 --save-interval 0"
  Q_DIFF=(MAX_NEW_TOKENS=64 LIMIT=96) Q_EVAL=(MAX_TOKENS=64)
  EVAL_LIMIT=${EVAL_LIMIT:-16} DIFFICULTY_K=${DIFFICULTY_K:-2} K=${K:-2}
fi
[[ " ${STAGES[*]} " == *" $FROM "* ]] || { echo "FROM=$FROM: not a stage (${STAGES[*]})" >&2; exit 2; }
started=0
CLUSTER=yes  # does a Slurm controller answer? asked once (sinfo waits ~10 s for a controller that is down)
if [ "${SUBMITIT:-0}" = 1 ] && [ "${SUBMITIT_LOCAL:-0}" != 1 ] && ! sinfo -h >/dev/null 2>&1; then CLUSTER=no; fi
submit() {  # submit NAME SCRIPT VAR=VALUE...: prints the job id
  local name=$1 script=$2; shift 2
  [ "$name" = "$FROM" ] && started=1
  if [ "$started" = 0 ]; then echo "skipped $name (FROM=$FROM)" >&2; return; fi
  if [ "$name" = difficulty ] && [ "$DIFFICULTY" != 1 ]; then echo "skipped $name (DIFFICULTY=$DIFFICULTY)" >&2; return; fi
  if [ "$name" = data ] && [ "$SIZE" != tiny ]; then echo "skipped $name (SIZE=$SIZE: DATA=$DATA)" >&2; return; fi
  local dep=(); [ -n "$prev" ] && dep=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
  local cmd=(env "$@" sbatch --parsable --export=ALL --job-name="$name" "${RES[@]}" "${EXTRA[@]}" "${dep[@]}" "$script")
  if [ "${SUBMITIT:-0}" = 1 ]; then  # the same jobs through megatron_ring.launch (submitit)
    local over=() f; for f in "${RES[@]}" "${EXTRA[@]}"; do over+=("${f#--}"); done
    cmd=("${PY:-.venv/bin/python}" -m megatron_ring.cli submit "$script" --env "$@" --sbatch "${over[@]}")
    [ -n "$prev" ] && cmd+=(--after "$prev")
    # no cluster (or SUBMITIT_LOCAL=1): submitit's local executor, one process after the other
    if [ "${SUBMITIT_LOCAL:-0}" = 1 ] || [ "$CLUSTER" = no ]; then cmd+=(--local --wait); fi
  fi
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}" >&2; echo >&2
    prev="DRY_${name}"
  else
    prev=$("${cmd[@]}" | cut -d';' -f1)
    echo "submitted $name: job $prev" >&2
  fi
}
submit data slurm/data.sh RUN="$RUN"
submit sft slurm/sft_distill.sh RECIPE="sft_distill_$SIZE" "${NP[@]}" \
  SFT_ARGS="--data $D/sft/packed.parquet --init $BASE_CKPT --out $RUN/sft$Q_SFT"
submit select slurm/select_ckpt.sh RUN="$RUN/sft" PROMPTS="$D/rl_stage1/4_filtered.parquet" TOKENIZER="$TOK" \
  EVAL="$D/eval/math.parquet" SELECT_ARGS="$Q_SEL"
submit rl_stage1 slurm/rl_stage1.sh RECIPE="rl_stage1_$SIZE" "${NP[@]}" \
  RL_ARGS="--init $RUN/sft --out $RUN/rl_stage1 --prompts $D/rl_stage1/4_filtered.parquet --tokenizer $TOK --eval-sets $D/eval/math.parquet$Q_RL"
S2=$D/rl_stage2/4_filtered.parquet
if [ "$DIFFICULTY" = 1 ]; then S2=$D/rl_stage2/5_difficulty.parquet; fi
submit difficulty slurm/difficulty.sh CKPT="$RUN/rl_stage1" PROMPTS="$D/rl_stage2/4_filtered.parquet" \
  TOKENIZER="$TOK" OUT="$S2" RECIPE="rl_stage2_$SIZE" K="${DIFFICULTY_K:-4}" "${Q_DIFF[@]}"
submit rl_stage2 slurm/rl_stage2.sh RECIPE="rl_stage2_$SIZE" "${NP[@]}" \
  RL_ARGS="--init $RUN/rl_stage1 --out $RUN/rl_stage2 --prompts $S2 --tokenizer $TOK --eval-sets $D/eval/code.parquet $D/eval/science.parquet$Q_RL"
submit export slurm/export.sh CKPT="$RUN/rl_stage2" OUT="$RUN/export" TOKENIZER="$TOK"
if [ "$SIZE" = tiny ]; then  # the embedded held-out sets and AIME24, short replies; the RL recipe's temperature
  EV=(BENCHMARKS="${BENCHMARKS:-heldout_math heldout_code heldout_science aime24}" K="${K:-4}" MAX_TOKENS=192 "${Q_EVAL[@]}"
      EVAL_ARGS="--data-dir $D/eval --limit ${EVAL_LIMIT:-64} --temperature ${EVAL_T:-0.8}")
else
  EV=(BENCHMARKS="${BENCHMARKS:-aime24 aime25 humaneval}")
fi
submit eval_sft slurm/eval.sh CKPT="$RUN/sft" EXPORT="$RUN/sft/export" TOKENIZER="$TOK" LABEL=sft OUT="$RUN/eval" "${EV[@]}"
submit eval_final slurm/eval.sh MODEL="$RUN/export" LABEL=final OUT="$RUN/eval" "${EV[@]}"
echo "$prev"
