"""decontaminate: drop training rows sharing a word n-gram (default 13) with any benchmark item.
Benchmarks are files (JSONL/Parquet) with a question field; each removed row names the benchmark
file and item it hit."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from .io import BATCH, run_filter_step
from .schema import prompt_text
from .text import ngrams

QUESTION_FIELDS = ("prompt", "problem", "question", "Question", "input")


def _bench_items(path: Path):
    if path.suffix == ".jsonl":
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    yield i, json.loads(line)
    else:
        for i, row in enumerate(pq.read_table(str(path)).to_pylist()):
            yield i, row


def load_benchmark_ngrams(files: list[str | Path], n: int) -> dict[str, str]:
    """n-gram -> "file#item-id" for every item of every benchmark file."""
    index: dict[str, str] = {}
    for f in map(Path, files):
        found = False
        for i, row in _bench_items(f):
            text = next((row[k] for k in QUESTION_FIELDS if isinstance(row.get(k), str)), None)
            if text is None and isinstance(row.get("messages"), list):
                text = prompt_text(row)
            if text is None:
                raise ValueError(f"{f}: item {i} has no question field (one of {QUESTION_FIELDS} or messages)")
            found = True
            for g in ngrams(text, n):
                index.setdefault(g, f"{f.name}#{row.get('id', i)}")
        if not found:
            raise ValueError(f"{f}: no benchmark items")
    return index


def decontaminate(src: str | Path, dst: str | Path, benchmarks: list[str | Path], n: int = 13,
                  batch_size: int = BATCH, progress: bool = True) -> dict:
    index = load_benchmark_ngrams(benchmarks, n)

    def judge(rows):
        out = []
        for r in rows:
            hit = next((index[g] for g in ngrams(prompt_text(r), n) if g in index), None)
            out.append(None if hit is None else f"contaminated:{hit}")
        return out

    return run_filter_step("decontaminate", src, dst, judge, batch_size, progress=progress,
                           extra={"n": n, "benchmarks": [str(b) for b in benchmarks],
                                  "benchmark_ngrams": len(index)})
