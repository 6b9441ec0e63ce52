"""Benchmark: the data_tools pipeline end to end on N synthetic SFT rows (default 1M), each step in its
own process (peak RSS and rows/s per step), and the near-duplicate stage side by side with
datasketch's plain single-process MinHashLSH on the same texts (same shingles, bands, verification),
with recall on planted near-duplicates.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 1000000] [--side-by-side 200000] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the of and to in is that for it as with was on be by at this from or an are which we can has "
         "number sum integer triangle circle area prime value function equation root square point line angle "
         "probability expected total distance speed time rate ratio minimum maximum digit sequence series "
         "polynomial matrix vector graph vertex edge path cycle set subset element remainder divisor multiple "
         "positive negative real complex odd even first last each every find compute determine prove show").split()


def synth_rows(n: int, seed: int = 0, near_frac: float = 0.05, exact_frac: float = 0.01, bad_frac: float = 0.002):
    """SFT rows; ``planted``: ids of the planted duplicates (near: one word of a 50-80 word question
    substituted, Jaccard of 3-word shingles ~0.9; exact: a verbatim copy)."""
    rng = random.Random(seed)
    originals: list[str] = []
    planted: dict[str, str] = {}
    lines = []
    for i in range(n):
        u = rng.random()
        if originals and u < near_frac:
            j = rng.randrange(len(originals))
            w = originals[j].split()
            k = rng.randrange(len(w))
            w[k] = rng.choice(WORDS)  # one word substituted: Jaccard of 3-shingles ~0.9
            q = " ".join(w)
            planted[f"s{i}"] = "near"
        elif originals and u < near_frac + exact_frac:
            q = originals[rng.randrange(len(originals))]
            planted[f"s{i}"] = "exact"
        else:
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 80))) + f" {i}?"
            originals.append(q)
        if rng.random() < bad_frac:
            lines.append('{"id": "s%d", "messages": [' % i)  # broken JSON
            continue
        dom = rng.choices(["math", "code", "science", "other"], [64.5, 25.5, 9.2, 0.8])[0]
        a = f"<think>{q[:80]} ... so it follows.</think> The answer is \\boxed{{{i % 97}}}."
        if dom == "code":
            a = f"<think>plan: {q[:60]}</think>\n```python\nprint({i % 97})\n```"
        lines.append(json.dumps({"id": f"s{i}", "domain": dom, "source": "bench",
                                 "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}))
    return lines, planted


def run_step(args: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "data_tools", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"step {args[0]} failed:\n{r.stderr[-3000:]}")
    wall = time.perf_counter() - t
    rep = json.loads(r.stdout[r.stdout.index("{"):]) if args[0] != "stats" else {}
    rep["wall_s"] = round(wall, 2)
    return rep


def side_by_side(texts: list[str], ids: list[str], planted: set[str], threshold: float = 0.8) -> list[dict]:
    from datasketch import MinHash, MinHashLSH

    from data_tools.dedup import NearDupIndex
    from data_tools.text import shingles

    rows = []
    # rensa (ours): batch MinHash in Rust + LSH + Jaccard verification
    t = time.perf_counter()
    idx = NearDupIndex(threshold=threshold)
    flagged = set()
    for s in range(0, len(texts), 8192):
        for rid, hit in zip(ids[s:s + 8192], idx.check_batch(texts[s:s + 8192], ids[s:s + 8192])):
            if hit is not None:
                flagged.add(rid)
    rows.append(("data_tools (rensa)", time.perf_counter() - t, flagged))
    # datasketch: the same shingles, bands and verification, one MinHash object per row
    b, r = idx.bands, idx.rows
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=b * r, params=(b, r))
    kept: dict[str, MinHash] = {}
    flagged = set()
    for rid, text in zip(ids, texts):
        m = MinHash(num_perm=b * r, seed=1)
        m.update_batch([s.encode() for s in shingles(text, idx.shingle)])
        if any(m.jaccard(kept[k]) >= threshold for k in lsh.query(m)):
            flagged.add(rid)
        else:
            lsh.insert(rid, m)
            kept[rid] = m
    rows.append(("datasketch MinHashLSH", time.perf_counter() - t, flagged))
    out = []
    for name, secs, fl in rows:
        out.append({"impl": name, "seconds": secs, "rows_per_s": len(texts) / secs,
                    "recall": len(fl & planted) / max(1, len(planted)), "false_positives": len(fl - planted)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--side-by-side", type=int, default=200_000, help="rows for the rensa vs datasketch run")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="data_bench_"))
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    lines, planted = synth_rows(a.rows)
    (out / "raw.jsonl").write_text("\n".join(lines) + "\n")
    print(f"generated {a.rows:,} rows ({len(planted):,} planted near/exact duplicates) in {time.perf_counter() - t:.1f} s -> {out}")

    from megatron_ring.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(512, out / "tok")
    bench = out / "benchmark.jsonl"  # 500 training questions reused as a "benchmark" to decontaminate against
    with open(bench, "w") as f:
        for ln in lines[1000:1500]:
            try:
                f.write(json.dumps({"problem": json.loads(ln)["messages"][0]["content"]}) + "\n")
            except json.JSONDecodeError:
                pass
    rng = random.Random(1)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"id": f"s{i}", "reward": float(rng.random() < 0.5)}
                                         for i in range(0, a.rows, 3) for _ in range(4)]), str(out / "rollouts.parquet"))
    steps = [("ingest", ["ingest", out / "raw.jsonl", out / "1.parquet", "--kind", "sft"]),
             ("dedup", ["dedup", out / "1.parquet", out / "2.parquet"]),
             ("decontaminate", ["decontaminate", out / "2.parquet", out / "3.parquet", "--benchmark", bench]),
             ("filter", ["filter", out / "3.parquet", out / "4.parquet", "--kind", "sft"]),
             ("difficulty", ["difficulty", out / "4.parquet", out / "5.parquet", "--rollouts", out / "rollouts.parquet"]),
             ("mix", ["mix", out / "5.parquet", out / "6.parquet"]),
             ("pack", ["pack", out / "6.parquet", out / "packed.parquet", "--tokenizer", out / "tok", "--seq-len", "4096"]),
             ("stats", ["stats", out / "6.parquet", out / "stats"])]
    print(f"\npipeline on {a.rows:,} rows, one process per step\n")
    print(f"| {'step':14} | {'rows in':>9} | {'kept':>9} | {'removed':>9} | {'rows/s':>9} | {'wall s':>7} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 13}|")
    for name, args in steps:
        r = run_step(args)
        if name == "stats":
            print(f"| {name:14} | {'':>9} | {'':>9} | {'':>9} | {'':>9} | {r['wall_s']:7.1f} | {'':>11} |")
            continue
        print(f"| {name:14} | {r['rows_in']:9,} | {r['rows_kept']:9,} | {r['rows_removed']:9,} | "
              f"{r['rows_per_s']:9,.0f} | {r['wall_s']:7.1f} | {r['peak_rss_mb']:11,.0f} |")

    n = min(a.side_by_side, a.rows)
    texts, ids = [], []
    for ln in lines[:n]:
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        texts.append(row["messages"][0]["content"])
        ids.append(row["id"])
    planted_here = {k for k in planted if int(k[1:]) < n}
    res = side_by_side(texts, ids, planted_here)
    base = res[1]["seconds"]
    print(f"\nnear-duplicate stage side by side on the same {len(texts):,} questions "
          f"({len(planted_here):,} planted near/exact duplicates, threshold 0.8)\n")
    print(f"| {'implementation':24} | {'seconds':>8} | {'rows/s':>9} | {'recall':>7} | {'false pos':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 10}|")
    for r in res:
        print(f"| {r['impl']:24} | {r['seconds']:8.1f} | {r['rows_per_s']:9,.0f} | {r['recall']:7.3f} | "
              f"{r['false_positives']:9,} | {base / r['seconds']:7.1f}x |")


if __name__ == "__main__":
    main()
