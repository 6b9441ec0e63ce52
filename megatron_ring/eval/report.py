"""The results table in the layout of the Ring-lite paper's Table 1 (benchmarks grouped by domain as rows, models
as columns, the paper's Ring-lite figures beside ours), as Markdown and CSV, plus a bar plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path

# Ring-lite, Table 1 of arXiv 2506.14731 (avg over samples at T=1.0, top-p 0.95, 32K tokens).
PAPER = {"aime24": 76.61, "aime25": 69.11, "math500": 96.65, "livecodebench": 60.66, "codeforces": 86.45,
         "gpqa_diamond": 61.05}
LAYOUT = [("Math", ["aime24", "aime25", "math500", "olympiadbench"]),
          ("Code", ["livecodebench", "codeforces", "humaneval"]),
          ("Science", ["gpqa_diamond"]),
          ("Embedded held-out", ["heldout_math", "heldout_code", "heldout_science"])]
TITLES = {"aime24": "AIME24", "aime25": "AIME25", "math500": "MATH-500", "olympiadbench": "OlympiadBench",
          "livecodebench": "LiveCodeBench", "codeforces": "Codeforces (percentile)", "humaneval": "HumanEval",
          "gpqa_diamond": "GPQA-Diamond", "heldout_math": "held-out math", "heldout_code": "held-out code",
          "heldout_science": "held-out science"}


def collect(out: str | Path) -> dict[str, dict[str, dict]]:
    """{label: {benchmark: report}} from every ``<out>/<label>/<benchmark>.json``."""
    res: dict[str, dict[str, dict]] = {}
    for f in sorted(Path(out).glob("*/*.json")):
        if f.name == "config.json":
            continue
        r = json.loads(f.read_text())
        if "metrics" in r:
            res.setdefault(r["label"], {})[r["benchmark"]] = r
    return res


def score_of(r: dict) -> float:
    n = r["metrics"]["samples_per_problem"]
    return 100.0 * r["metrics"][f"avg@{n}"]


def write_table(out: str | Path, labels: list[str] | None = None) -> dict[str, Path]:
    out = Path(out)
    res = collect(out)
    labels = labels or list(res)
    benches = [(dom, b) for dom, bs in LAYOUT for b in bs if b in PAPER or any(b in res[m] for m in labels)]
    header = ["Domain", "Benchmark", "Ring-lite (paper)"] + [f"{m} (avg@{_k(res[m])})" for m in labels]
    rows = []
    for dom, b in benches:
        cells = [f"{PAPER[b]:.2f}" if b in PAPER else "—"]
        cells += [f"{score_of(res[m][b]):.2f}" if b in res[m] else "—" for m in labels]
        rows.append([dom, TITLES.get(b, b)] + cells)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    notes = [f"- **{m}**: " + "; ".join(
        f"{TITLES.get(b, b)} {r['metrics']['problems']} problems × {r['metrics']['samples_per_problem']} samples, "
        f"pass@k " + ", ".join(f"{k}: {100 * v:.1f}" for k, v in r["metrics"]["pass@k"].items())
        + f", mean {r['mean_completion_tokens']} tokens, {r['truncated']} truncated"
        for b, r in res[m].items()) for m in labels]
    settings = {m: next(iter(res[m].values()))["settings"] for m in labels}
    text = ("# Evaluation (layout of Ring-lite Table 1; scores are avg@k in %)\n\n" + "\n".join(md) + "\n\n"
            + "\n".join(notes) + "\n\nSampling: " + "; ".join(
                f"{m}: T={s['temperature']}, top-p={s['top_p']}, max tokens {s['max_tokens']}" for m, s in settings.items())
            + ". Paper figures: Ring-lite, arXiv 2506.14731 Table 1 (T=1.0, top-p 0.95, 32K).\n")
    paths = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "results.png"}
    paths["md"].write_text(text)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["domain", "benchmark", "ring_lite_paper"] + labels)
        for (dom, b), r in zip(benches, rows):
            w.writerow([dom, b] + [c if c != "—" else "" for c in r[2:]])
    _plot(paths["png"], benches, res, labels)
    return paths


def _k(r: dict[str, dict]) -> str:
    ks = sorted({x["metrics"]["samples_per_problem"] for x in r.values()})
    return "/".join(map(str, ks))


def _plot(path: Path, benches, res, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [b for _, b in benches]
    series = [("Ring-lite (paper)", [PAPER.get(b) for b in names])]
    series += [(m, [score_of(res[m][b]) if b in res[m] else None for b in names]) for m in labels]
    x, w = np.arange(len(names)), 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    for i, (lab, vals) in enumerate(series):
        ax.bar(x + i * w - 0.4 + w / 2, [v if v is not None else 0 for v in vals], w, label=lab,
               hatch="//" if i == 0 else None, alpha=0.6 if i == 0 else 1.0)
    ax.set_xticks(x, [TITLES.get(b, b) for b in names], rotation=30, ha="right")
    ax.set_ylabel("avg@k (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Evaluation vs the paper's Ring-lite (Table 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
