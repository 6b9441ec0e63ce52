#!/usr/bin/env bash
#SBATCH --job-name=difficulty
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --mem=128G
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
# Ring-lite's difficulty filter of RL prompts by the policy that will train on them: K sampled answers per prompt
# from CKPT (`megatron-ring rollouts`, scored by the RL rewards), then `data_tools difficulty` keeps the prompts it
# sometimes solves (drops always- and never-solved: their GRPO groups have zero advantage and train nothing).
#   CKPT=runs/tiny/rl_stage1 PROMPTS=runs/tiny/data/rl_stage2/4_filtered.parquet TOKENIZER=runs/tiny/data/tokenizer \
#   OUT=runs/tiny/data/rl_stage2/5_difficulty.parquet bash slurm/difficulty.sh
#   RECIPE: the RL recipe the prompts are for (default rl_stage2_tiny): its samples_per_prompt, max_new_tokens and
#   temperature are the defaults of K, MAX_NEW_TOKENS and TEMPERATURE. LIMIT: rate only the first LIMIT prompts
#   (the others are kept unrated; the pipeline's QUICK=1).
#   SHARDS: rollout processes side by side, each on every SHARDS-th chunk of CHUNK (16) prompts (default: the CPUs
#   given, one intra-op thread each); ROLLOUTS: their files' prefix (default: OUT without .parquet)
#   + .rollouts-I.parquet.
# On a GPU allocation the rollouts run on an SGLang server started for the job (TP = the node's GPUs; the checkpoint
# exported to ROLLOUTS.hf, the context = the prompts' cap + MAX_NEW_TOKENS), one client process; on CPU, the
# in-process engine in SHARDS processes. The same seeds give the same samples either way.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # under sbatch the script runs from Slurm's spool copy:
[ -f "$HERE/launch.sh" ] || HERE="${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm"  # then the repo is where it was submitted
source "$HERE/launch.sh"
mkdir -p logs
OUT=${OUT:?set OUT}
RECIPE=${RECIPE:-rl_stage2_tiny}
rget() { "$PY" -m megatron_ring.cli recipes --get "$RECIPE" "stages.rl.$1"; }
K=${K:-$(rget samples_per_prompt)}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-$(rget max_new_tokens)}
TEMPERATURE=${TEMPERATURE:-$(rget temperature)}
ROLLOUTS=${ROLLOUTS:-${OUT%.parquet}}
SHARDS=${SHARDS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
echo "[$(date +%T)] rollouts of ${PROMPTS:?set PROMPTS} by ${CKPT:?set CKPT}: K=$K, T=$TEMPERATURE," \
  "max $MAX_NEW_TOKENS new tokens, $SHARDS process(es)"
pids=() files=() serve=()
if [ "$(gpus_per_node)" -gt 0 ]; then
  SHARDS=1
  "$PY" -m megatron_ring.cli export --ckpt "$CKPT" --out "$ROLLOUTS.rollouts-0.parquet.hf" --tokenizer "$TOKENIZER"
  job_server "$ROLLOUTS.rollouts-0.parquet.hf" $((${MAX_PROMPT_TOKENS:-2048} + MAX_NEW_TOKENS))
  serve=(--sglang-urls "$SERVER_URL")
fi
for ((i = 0; i < SHARDS; i++)); do
  files+=("$ROLLOUTS.rollouts-$i.parquet")
  "$PY" -m megatron_ring.cli rollouts --ckpt "$CKPT" --prompts "$PROMPTS" --tokenizer "${TOKENIZER:?set TOKENIZER}" \
    --out "${files[i]}" --k "$K" --max-new-tokens "$MAX_NEW_TOKENS" \
    --temperature "$TEMPERATURE" --chunk "${CHUNK:-16}" --shard "$i/$SHARDS" ${LIMIT:+--limit "$LIMIT"} "${serve[@]}" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' TERM INT
for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed shard fails the job
"$PY" -m data_tools difficulty "$PROMPTS" "$OUT" --rollouts "${files[@]}"
