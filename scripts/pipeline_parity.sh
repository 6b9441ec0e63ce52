#!/usr/bin/env bash
# The tiny pipeline (slurm/pipeline.sh QUICK=1: all nine stages, fewer steps) three ways, then their figures side by
# side: sbatch on the local Slurm cluster, megatron_ring.launch (submitit) on that cluster, and submitit's local
# executor (no Slurm: one process after the other). The launchers must not change a result: every figure is
# compared exactly (selection, both RL stages' per-step metrics, the difficulty filter's rows, the eval table).
#   bash scripts/pipeline_parity.sh [OUT]     # OUT default runs/parity; ≈35 min on 2 CPU cores
#   COMPARE_ONLY=1 bash scripts/pipeline_parity.sh   # the table of the runs already there
# Needs the local cluster (bash slurm/local/start.sh, root). Exit 1 when any figure differs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/parity}
PY=${PY:-.venv/bin/python}
export PY PYTHONUNBUFFERED=1
sinfo -h >/dev/null 2>&1 || { echo "no Slurm cluster answers (bash slurm/local/start.sh)" >&2; exit 2; }
mkdir -p "$OUT" logs
follow() {  # follow JOBID: until it has left the queue
  while squeue -h -j "$1" 2>/dev/null | grep -q .; do sleep 10; done
}
for way in sbatch submitit_slurm submitit_local; do
  [ "${COMPARE_ONLY:-0}" = 1 ] && break  # (the runs are there: the table only)
  run=$OUT/$way
  rm -rf "$run"
  T0=$SECONDS
  case $way in
    sbatch) last=$(QUICK=1 RUN=$run bash slurm/pipeline.sh | tail -1); follow "$last" ;;
    submitit_slurm) last=$(QUICK=1 SUBMITIT=1 RUN=$run bash slurm/pipeline.sh | tail -1); follow "$last" ;;
    submitit_local) QUICK=1 SUBMITIT=1 SUBMITIT_LOCAL=1 RUN=$run bash slurm/pipeline.sh >/dev/null ;;
  esac
  echo "$way: $((SECONDS - T0)) s" | tee "$run.seconds"
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

import pyarrow.parquet as pq

out = Path(sys.argv[1])
ways = ["sbatch", "submitit_slurm", "submitit_local"]


def figures(run: Path) -> dict:
    f = {}
    sel = run / "sft/selection/selection.json"
    if sel.exists():  # the pick and every checkpoint's measured entropy (the pick is None outside the window)
        d = json.loads(sel.read_text())
        f["selection: pick; entropy per checkpoint"] = f"{d['selected']}; " + ", ".join(
            f"{e['checkpoint'][-4:]}: {e['entropy']:.6f}" for e in d["entries"])
    else:
        f["selection: pick; entropy per checkpoint"] = None
    for stage in ("rl_stage1", "rl_stage2"):
        p = run / stage / "metrics.jsonl"
        rows = [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []
        drop = ("time", "seconds", "elapsed", "tokens_per_s", "throughput", "sync")  # wall clock, not results
        rows = [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in rows]
        f[f"{stage} steps"] = len(rows)
        f[f"{stage} final reward/mean"] = next((r["reward/mean"] for r in reversed(rows) if "reward/mean" in r), None)
        f[f"{stage} per-step metrics"] = rows
    d = run / "data/rl_stage2/5_difficulty.parquet"
    f["difficulty-filtered prompts"] = pq.read_table(d).num_rows if d.exists() else None
    r = run / "eval/results.json"
    f["eval table"] = json.loads(r.read_text()) if r.exists() else (run / "eval/results.md").read_text() \
        if (run / "eval/results.md").exists() else None
    return f


fig = {w: figures(out / w) for w in ways}
secs = {w: (out / f"{w}.seconds").read_text().split(": ")[1].strip() for w in ways}
ok = True
print("| figure | " + " | ".join(ways) + " | equal |")
print("|---|" + "---|" * (len(ways) + 1))
for k in fig["sbatch"]:
    vals = [fig[w][k] for w in ways]
    same = all(v == vals[0] for v in vals) and vals[0] is not None
    ok &= same
    show = [("(%d rows)" % len(v) if isinstance(v, list) else "(table)" if isinstance(v, (dict, str)) and k == "eval table"
             else f"{v:.4f}" if isinstance(v, float) else str(v)) for v in vals]
    print(f"| {k} | " + " | ".join(show) + f" | {'yes' if same else 'NO'} |")
print("| wall time | " + " | ".join(secs[w] for w in ways) + " | |")
if isinstance(fig["sbatch"]["eval table"], str):
    print("\n" + fig["sbatch"]["eval table"])
sys.exit(0 if ok else 1)
PYEOF
