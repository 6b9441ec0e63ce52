"""stats: length histogram and domain mix of a Parquet (SFT, RL or packed), as a PNG and a table."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .io import iter_batches
from .schema import prompt_text, response_text


def _lengths(rows, tok):
    for r in rows:
        if "seq_lens" in r:
            for n in r["seq_lens"]:
                yield "packed", n
            continue
        text = response_text(r) if "messages" in r else prompt_text(r)
        n = len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else len(text)
        yield r.get("domain") or "other", n


def stats(src: str | Path, out_prefix: str | Path, tokenizer: str | Path | None = None, title: str = "") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok = None
    if tokenizer:
        from megatron_ring.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    unit = "tokens" if tok is not None or "packed" in str(src) else "chars"
    lens: dict[str, list[int]] = defaultdict(list)
    for b in iter_batches(src):
        for dom, n in _lengths(b.to_pylist(), tok):
            lens[dom].append(n)
    total = sum(len(v) for v in lens.values())
    table = []
    for dom in sorted(lens, key=lambda d: -len(lens[d])):
        a = np.asarray(lens[dom])
        table.append({"domain": dom, "rows": len(a), "share_pct": round(100 * len(a) / max(total, 1), 1),
                      f"mean_{unit}": round(float(a.mean()), 1), "p50": int(np.percentile(a, 50)),
                      "p90": int(np.percentile(a, 90)), "max": int(a.max())})
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    allv = np.concatenate([np.asarray(v) for v in lens.values()]) if total else np.zeros(1)
    bins = np.linspace(0, max(1, allv.max()), 40)
    for dom in lens:
        ax1.hist(lens[dom], bins=bins, alpha=0.6, label=dom)
    ax1.set_xlabel(f"length ({'response ' if unit != 'tokens' or tok else ''}{unit})")
    ax1.set_ylabel("rows")
    ax1.set_title("length histogram")
    ax1.legend()
    ax2.bar([t["domain"] for t in table], [t["share_pct"] for t in table], color="tab:orange")
    ax2.set_ylabel("% of rows")
    ax2.set_title("domain mix")
    fig.suptitle(title or Path(src).name)
    fig.tight_layout()
    png = out_prefix.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    cols = list(table[0]) if table else ["domain", "rows"]
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    md += "".join("| " + " | ".join(str(t[c]) for c in cols) + " |\n" for t in table)
    out_prefix.with_suffix(".md").write_text(md)
    rep = {"input": str(src), "rows": total, "unit": unit, "table": table, "plot": str(png)}
    out_prefix.with_suffix(".json").write_text(json.dumps(rep, indent=2) + "\n")
    return rep
