#!/usr/bin/env bash
# README command #1: set up and run the main job on the embedded default (tiny model, bundled data, CPU):
# the Ring-lite recipe end to end, each stage through its Slurm script —
#   data curation -> a fresh tiny Ring-lite-shaped MoE (the "base model") -> distillation SFT (2 epochs,
#   checkpoint every 50 steps) -> entropy-based checkpoint selection -> C3PO RL stage 1 (math) -> curves.
# The RL stage is the headline use `sbatch slurm/rl_stage1.sh`: submitted to Slurm when a cluster answers
# (`sinfo`), else the same script runs here. ≈40 min on 2 CPU cores.
#   bash scripts/main.sh            # the full run (runs/tiny)
#   bash scripts/main.sh --quick    # every stage with fewer steps, ≈5 min, for a first look (runs/quick)
# Every stage prints progress lines as it goes (step, elapsed, ETA, its key figure; `> log` fills live), its wall
# time at its end, and the job ends with a summary: where the outputs are and the headline figures.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=${QUICK:-0}
[ "${1:-}" = "--quick" ] && QUICK=1
bash scripts/setup_env.sh
PY=.venv/bin/python
if [ "$QUICK" = 1 ]; then RUN=${RUN_DIR:-runs/quick}; else RUN=${RUN_DIR:-runs/tiny}; fi
# one torch thread, as parallel/dist.py advises on 2 CPUs (after the first checkpoint save gloo's worker threads hold
# OpenMP teams too). Measured 2026-12-06 on the 2-core machine: RL with a checkpoint every step generated in
# 1.43-1.57 s/step at 1 thread against 1.60-2.33 s at 2 (6 steps, two runs each); SFT of --quick took 4m27s against
# 3m51s. The RL half of the full job gains what SFT loses, and the job runs without the warning.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PY PYTHONUNBUFFERED=1
mkdir -p "$RUN" logs
T0=$SECONDS
TIMES=()
hms() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
stage() { STAGE="$1"; ST0=$SECONDS; echo "== $1 [$(date +%H:%M:%S)]"; }
stage_done() { local t=$((SECONDS - ST0)); TIMES+=("$STAGE|$(hms $t)"); echo "   done in $(hms $t)"; }
# the stages' own lines (JSON records, [stage] progress lines, errors, megatron-ring notes), as they come
show() { grep --line-buffered -E '^\{|^\[|rror|^megatron-ring' || true; }
# a line every 20 s for steps that print nothing of their own while they work
beat() { ( while sleep 20; do echo "   ... $STAGE: $(hms $((SECONDS - ST0))) elapsed"; done ) & BEAT=$!; }
unbeat() { if [ -n "$BEAT" ]; then kill "$BEAT" 2>/dev/null || true; wait "$BEAT" 2>/dev/null || true; fi; BEAT=""; }
BEAT=""
trap unbeat EXIT
if [ "$QUICK" = 1 ]; then
  echo "quick mode: every stage with fewer steps -> $RUN (the full run: bash scripts/main.sh)"
  SFT_EXTRA="--max-steps 160 --save-interval 40 --log-interval 20"
  SELECT_EXTRA="--limit 16 --max-new-tokens 64"
  RL_EXTRA="--steps 4 --prompts-per-step 8 --eval-limit 24 --eval-interval 0 --save-interval 0"
else
  SFT_EXTRA="--log-interval 25"; SELECT_EXTRA="--limit 100 --max-new-tokens 192"; RL_EXTRA=""
fi

stage "1/6 data: the embedded default sets through the curation pipeline -> $RUN/data"
beat
$PY -m data_tools default "$RUN/data" | $PY -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({k: s[k] for k in ("seconds","eval_disjoint_from_training","rows","sft_packed_rows","eval_rows")}))'
unbeat; stage_done

stage "2/6 base model: random tiny MoE + tokenizer -> $RUN/hf_init -> megatron dist checkpoint $RUN/mcore"
[ -f "$RUN/mcore/megatron_ring.json" ] || {  # (each stage resumes / skips what is done: rerunning is cheap)
  beat
  $PY -m megatron_ring.cli init --recipe tiny --out "$RUN/hf_init"
  $PY -m megatron_ring.cli convert hf-to-mcore --hf "$RUN/hf_init" --out "$RUN/mcore"
  unbeat; }
stage_done

stage "3/6 distillation SFT (slurm/sft_distill.sh, recipe sft_distill_tiny) -> $RUN/sft"
RECIPE=sft_distill_tiny NPROC=1 SFT_ARGS="--data $RUN/data/sft/packed.parquet --init $RUN/mcore --out $RUN/sft $SFT_EXTRA" \
  bash slurm/sft_distill.sh 2>&1 | show
test -f "$RUN/sft/checkpoints/latest"
stage_done

stage "4/6 entropy-based checkpoint selection (slurm/select_ckpt.sh, window 0.3-0.5) -> $RUN/sft/checkpoints/selected"
[ -f "$RUN/sft/checkpoints/selected" ] || PROMPTS="$RUN/data/rl_stage1/4_filtered.parquet" TOKENIZER="$RUN/data/tokenizer" \
  EVAL="$RUN/data/eval/math.parquet" SELECT_ARGS="$SELECT_EXTRA" RUN="$RUN/sft" \
  bash slurm/select_ckpt.sh 2>&1 | show
cat "$RUN/sft/selection/selection.md"
stage_done

stage "5/6 C3PO RL stage 1: sbatch slurm/rl_stage1.sh (recipe rl_stage1_tiny) -> $RUN/rl_stage1"
RL_ARGS="--init $RUN/sft --out $RUN/rl_stage1 --prompts $RUN/data/rl_stage1/4_filtered.parquet --tokenizer $RUN/data/tokenizer --eval-sets $RUN/data/eval/math.parquet $RL_EXTRA"
if command -v sbatch >/dev/null 2>&1 && sinfo -h >/dev/null 2>&1; then
  jid=$(RECIPE=rl_stage1_tiny RL_ARGS="$RL_ARGS" sbatch --parsable --export=ALL --nodes=1 --gpus-per-node=0 \
        --cpus-per-task=2 --mem=16G --oversubscribe --time=02:00:00 slurm/rl_stage1.sh)
  echo "submitted job $jid; following logs/rl_stage1-$jid.out"
  ( while squeue -h -j "$jid" 2>/dev/null | grep -q .; do sleep 5; done ) & waiter=$!
  # live, until the job has left the queue (tail exits 1 when the log did not exist yet at its start)
  { tail -n +1 -F --pid="$waiter" "logs/rl_stage1-$jid.out" 2>/dev/null || true; } | show
  wait "$waiter" || true
else
  RECIPE=rl_stage1_tiny NPROC=1 RL_ARGS="$RL_ARGS" bash slurm/rl_stage1.sh 2>&1 | show
fi
test -f "$RUN/rl_stage1/metrics.jsonl"
stage_done

stage "6/6 curves -> $RUN/rl_stage1/rl_curves.png"
$PY -m megatron_ring.cli rl-plot "$RUN/rl_stage1"
stage_done

echo
echo "== main job done in $(hms $((SECONDS - T0))) -> $RUN"
printf '   %-100s %s\n' "stage" "wall time"
for t in "${TIMES[@]}"; do printf '   %-100s %s\n' "${t%%|*}" "${t##*|}"; done
$PY - "$RUN" <<'PYEOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
sel = json.loads((run / "sft/selection/selection.json").read_text())
pick = next((e for e in sel["entries"] if e["checkpoint"] == sel["selected"]), None)
print(f"   data:      {run / 'data'} (curated sets, tokenizer, packed SFT rows)")
print(f"   SFT:       {run / 'sft'} (checkpoints, tb/); selected {sel['selected']} - {sel['why']}"
      + (f"; its held-out math accuracy {pick['accuracy']:.2f}" if pick and pick.get("accuracy") is not None else ""))
m = [json.loads(l) for l in open(run / "rl_stage1/metrics.jsonl")]
ev = [(r["step"], r["eval/math"]) for r in m if "eval/math" in r]
print(f"   RL:        {run / 'rl_stage1'} (checkpoints, metrics.jsonl, tb/, rl_curves.png)")
print("   held-out math accuracy (the recipe's eval: avg@k at the rollout temperature; greedy when k=1) by RL step:",
      ", ".join(f"{s}: {a:.2f}" for s, a in ev), f"(lift {ev[-1][1] - ev[0][1]:+.2f})")
print(f"   see:       tensorboard --logdir {run}; {run / 'rl_stage1/rl_curves.png'}; {run / 'sft/selection/selection.png'}")
PYEOF
