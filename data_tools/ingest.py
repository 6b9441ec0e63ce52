"""ingest/validate: JSONL, Parquet or a local HF ``datasets`` folder -> one typed Parquet per kind.
Rows that cannot be typed (broken JSON, missing fields, wrong types, empty answers) go to the
quarantine file with file, row number and reason; nothing is dropped silently."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .io import BATCH, Writer, finish_report
from .schema import QUARANTINE_SCHEMA, SCHEMAS, VALIDATORS, BadRow


def quarantine_path(dst: Path) -> Path:
    return dst.with_name(dst.stem + ".quarantine.parquet")


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet", ".arrow"))
        if not files:
            raise FileNotFoundError(f"{path}: no .jsonl/.parquet/.arrow files (HF datasets folders hold .arrow)")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return [path]


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.memory_map(str(path)) as src:
        try:
            reader = pa.ipc.open_stream(src)  # what datasets.save_to_disk writes
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(src)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def read_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(row number, parsed row or None, raw text for broken rows). JSONL rows count from line 1."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield lineno, None, f"{line.rstrip()}  [{e}]"
        return
    batches = _arrow_batches(path) if path.suffix == ".arrow" else pq.ParquetFile(str(path)).iter_batches(BATCH)
    n = 0
    for b in batches:
        for row in b.to_pylist():
            yield n, row, None
            n += 1


def ingest(src: str | Path, dst: str | Path, kind: str, progress: bool = True) -> dict:
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be one of {sorted(SCHEMAS)}, got {kind!r}")
    src, dst = Path(src), Path(dst)
    validate = VALIDATORS[kind]
    out, quarantine = Writer(dst, SCHEMAS[kind]), Writer(quarantine_path(dst), QUARANTINE_SCHEMA)
    reasons: Counter = Counter()
    seen_ids: set[str] = set()
    n_in, t0 = 0, time.perf_counter()
    good: list[dict] = []
    bad: list[dict] = []
    bar = tqdm(desc=f"ingest[{kind}]", unit="row", disable=not progress, file=sys.stderr, mininterval=1)
    try:
        for f in _input_files(src):
            for rowno, row, raw in read_rows(f):
                n_in += 1
                try:
                    if row is None:
                        raise BadRow("broken_json")
                    if not isinstance(row, dict):
                        raise BadRow("wrong_type:row", f"expected an object, got {type(row).__name__}")
                    typed = validate(row, default_id=f"{f.stem}:{rowno}")
                    if typed["id"] in seen_ids:
                        raise BadRow("duplicate_id", typed["id"])
                    seen_ids.add(typed["id"])
                    good.append(typed)
                except BadRow as e:
                    reasons[e.reason] += 1
                    text = raw if raw is not None else json.dumps(row, default=str, ensure_ascii=False)
                    bad.append({"file": str(f), "row": rowno, "reason": str(e), "raw": text})
                if len(good) >= BATCH:
                    out.write_rows(good)
                    good = []
                if len(bad) >= BATCH:
                    quarantine.write_rows(bad)
                    bad = []
                bar.update(1)
        out.write_rows(good)
        quarantine.write_rows(bad)
    finally:
        bar.close()
        out.close()
        quarantine.close()
    return finish_report("ingest", src, dst, quarantine_path(dst), n_in, out.rows, reasons, t0, kind=kind)
