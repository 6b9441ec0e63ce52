"""Benchmark: C3PO (fixed token budget Φ per step, loss / Φ) vs GRPO (every generated token, per-response
token mean) side by side on the same prompts, the same start checkpoint and the same sampling seeds.

    .venv/bin/python benchmarks/c3po_vs_grpo.py [--init runs/tiny/sft] [--steps 12] [--budget 8192]

Prints, per mode: tokens trained per step (mean, coefficient of variation), train-step time (mean, CV),
gradient norm (mean, CV), and the ratio of each CV to GRPO's (the baseline). The paper's claim is that
C3PO's constant Φ makes per-step compute and gradient scale steady (Ring-lite Fig. 7).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _rl_args import rl_run_parser  # benchmarks/ (this script's folder)

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, a, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m",
           "megatron_ring.cli", "rl", "--recipe", a.recipe, "--init", a.init, "--out", str(out), "--mode", mode,
           "--steps", str(a.steps), "--token-budget", str(a.budget), "--prompts-per-step", str(a.prompts),
           "--eval-interval", "0", "--eval-limit", "1", "--save-interval", "0", "--prompts", a.prompts_file,
           "--tokenizer", a.tokenizer, "--eval-sets", a.eval_set]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"OMP_NUM_THREADS": "2", **os.environ})
    if r.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{r.stderr[-3000:]}")
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward/mean"' in x]


def cv(xs: list[float]) -> float:
    return statistics.pstdev(xs) / statistics.mean(xs) if xs and statistics.mean(xs) else float("nan")


def main() -> None:
    ap = rl_run_parser(steps=12, budget=8192, prompts=16)
    ap.add_argument("--eval-set", default="runs/tiny/data/eval/math.parquet")
    a = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as td:
        for mode in ("grpo", "c3po"):
            m = run(mode, a, Path(td) / mode)[1:]  # the first step pays one-off start-up costs
            rows[mode] = {"tokens": [r["tokens/kept"] for r in m], "time": [r["time/train"] for r in m],
                          "grad": [r["grad_norm"] for r in m]}
    base = {k: cv(v) for k, v in rows["grpo"].items()}
    print(f"\nC3PO (Φ={a.budget}) vs GRPO, {a.steps - 1} steps each, {a.prompts} prompts/step, same seeds\n")
    print(f"{'mode':<6} | {'tokens/step':>11} {'CV':>6} {'×GRPO':>6} | {'train s':>7} {'CV':>6} {'×GRPO':>6} | "
          f"{'grad-norm':>9} {'CV':>6} {'×GRPO':>6}")
    print("-" * 88)
    for mode, v in rows.items():
        c = {k: cv(x) for k, x in v.items()}
        print(f"{mode:<6} | {statistics.mean(v['tokens']):>11.0f} {c['tokens']:>6.3f} {c['tokens'] / base['tokens'] if base['tokens'] else float('nan'):>6.2f} | "
              f"{statistics.mean(v['time']):>7.2f} {c['time']:>6.3f} {c['time'] / base['time']:>6.2f} | "
              f"{statistics.mean(v['grad']):>9.4f} {c['grad']:>6.3f} {c['grad'] / base['grad']:>6.2f}")


if __name__ == "__main__":
    main()
