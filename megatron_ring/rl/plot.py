"""``megatron-ring rl-plot``: the Ring-lite paper's Fig. 7-style panels (reward, entropy, gradient norm,
training throughput, response length, tokens kept per step) for one or more RL runs side by side."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [("reward/mean", "reward"), ("entropy", "entropy"), ("grad_norm", "gradient norm"),
          ("tokens_per_s", "training tokens/s"), ("response_length", "response length"),
          ("tokens/kept", "tokens trained per step")]


def read_metrics(run: str | Path) -> list[dict]:
    p = Path(run) / "metrics.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no metrics (is {run} an RL run directory?)")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot(runs: list[str], out: str | Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for i, run in enumerate(runs):
        recs = [r for r in read_metrics(run) if "reward/mean" in r]
        label = labels[i] if labels else Path(run).name
        for ax, (key, title) in zip(axes.flat, PANELS):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label, lw=1.2)
            ax.set_title(title)
            ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ring rl-plot")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--labels", nargs="*")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    out = plot(a.runs, a.out or Path(a.runs[0]) / "rl_curves.png", a.labels)
    print(out)
    return 0
