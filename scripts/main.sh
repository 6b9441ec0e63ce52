#!/usr/bin/env bash
# README command #1: set up and run the main job on the embedded default (tiny model, bundled data, CPU):
# the Ring-lite recipe end to end, each stage through its Slurm script —
#   data curation -> a fresh tiny Ring-lite-shaped MoE (the "base model") -> distillation SFT (2 epochs,
#   checkpoint every 50 steps) -> entropy-based checkpoint selection -> C3PO RL stage 1 (math) -> curves.
# The RL stage is the headline use `sbatch slurm/rl_stage1.sh`: submitted to Slurm when a cluster answers
# (`sinfo`), else the same script runs here. ≈30 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
RUN=${RUN_DIR:-runs/tiny}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PY
mkdir -p "$RUN" logs
echo "== 1/6 data: the embedded default sets through the curation pipeline -> $RUN/data"
$PY -m data_tools default "$RUN/data" | $PY -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({k: s[k] for k in ("seconds","eval_disjoint_from_training","rows","sft_packed_rows","eval_rows")}))'
echo "== 2/6 base model: random tiny MoE + tokenizer -> $RUN/hf_init -> megatron dist checkpoint $RUN/mcore"
[ -f "$RUN/mcore/megatron_ring.json" ] || {  # (each stage resumes / skips what is done: rerunning is cheap)
  $PY -m megatron_ring.cli init --recipe tiny --out "$RUN/hf_init"
  $PY -m megatron_ring.cli convert hf-to-mcore --hf "$RUN/hf_init" --out "$RUN/mcore"; }
echo "== 3/6 distillation SFT (slurm/sft_distill.sh, recipe sft_distill_tiny) -> $RUN/sft"
RECIPE=sft_distill_tiny NPROC=1 SFT_ARGS="--data $RUN/data/sft/packed.parquet --init $RUN/mcore --out $RUN/sft --log-interval 25" \
  bash slurm/sft_distill.sh 2>&1 | grep -E '^\{|^\[|rror' || true
test -f "$RUN/sft/checkpoints/latest"
echo "== 4/6 entropy-based checkpoint selection (slurm/select_ckpt.sh, window 0.3-0.5) -> $RUN/sft/checkpoints/selected"
[ -f "$RUN/sft/checkpoints/selected" ] || PROMPTS="$RUN/data/rl_stage1/4_filtered.parquet" TOKENIZER="$RUN/data/tokenizer" \
  EVAL="$RUN/data/eval/math.parquet" SELECT_ARGS="--limit 100 --max-new-tokens 192" RUN="$RUN/sft" \
  bash slurm/select_ckpt.sh 2>&1 | grep -E '^\{|inside|nearest|rror' || true
cat "$RUN/sft/selection/selection.md"
echo "== 5/6 C3PO RL stage 1: sbatch slurm/rl_stage1.sh (recipe rl_stage1_tiny) -> $RUN/rl_stage1"
RL_ARGS="--init $RUN/sft --out $RUN/rl_stage1 --prompts $RUN/data/rl_stage1/4_filtered.parquet --tokenizer $RUN/data/tokenizer --eval-sets $RUN/data/eval/math.parquet"
if command -v sbatch >/dev/null 2>&1 && sinfo -h >/dev/null 2>&1; then
  jid=$(RECIPE=rl_stage1_tiny RL_ARGS="$RL_ARGS" sbatch --parsable --export=ALL --nodes=1 --gpus-per-node=0 \
        --cpus-per-task=2 --mem=16G --time=02:00:00 slurm/rl_stage1.sh)
  echo "submitted job $jid; waiting"
  while squeue -h -j "$jid" 2>/dev/null | grep -q .; do sleep 10; done
else
  RECIPE=rl_stage1_tiny NPROC=1 RL_ARGS="$RL_ARGS" bash slurm/rl_stage1.sh 2>&1 | grep -E '^\{|^\[|rror' || true
fi
test -f "$RUN/rl_stage1/metrics.jsonl"
echo "== 6/6 curves -> $RUN/rl_stage1/rl_curves.png"
$PY -m megatron_ring.cli rl-plot "$RUN/rl_stage1"
$PY - "$RUN" <<'PYEOF'
import json, sys
m = [json.loads(l) for l in open(f"{sys.argv[1]}/rl_stage1/metrics.jsonl")]
ev = [(r["step"], r["eval/math"]) for r in m if "eval/math" in r]
print("held-out math accuracy (the recipe's eval: avg@k at the rollout temperature; greedy when k=1) by RL step:", ", ".join(f"{s}: {a:.2f}" for s, a in ev))
print(f"lift: {ev[-1][1] - ev[0][1]:+.2f}")
PYEOF
echo "main job done: $RUN"
