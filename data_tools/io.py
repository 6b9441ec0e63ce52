"""Streaming Parquet steps: record batches in, kept rows out, removed rows to a side file with the
reason, progress on stderr, and a JSON report whose counts add up."""
from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

BATCH = 8192


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, because ru_maxrss survives fork+exec: a step started
    from a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def removed_path(dst: Path) -> Path:
    return dst.with_name(dst.stem + ".removed.parquet")


def report_path(dst: Path) -> Path:
    return dst.with_name(dst.stem + ".report.json")


def iter_batches(src: str | Path, batch_size: int = BATCH) -> Iterator[pa.RecordBatch]:
    pf = pq.ParquetFile(str(src))
    yield from pf.iter_batches(batch_size=batch_size)


def num_rows(src: str | Path) -> int:
    return pq.ParquetFile(str(src)).metadata.num_rows


class Writer:
    """A lazily opened ParquetWriter for one schema (an empty output still gets a file)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self._w = Path(path), schema, None
        self.rows = 0

    def write_rows(self, rows: list[dict]) -> None:
        if rows:
            self.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def write_table(self, table: pa.Table) -> None:
        if self._w is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._w = pq.ParquetWriter(str(self.path), self.schema)
        self._w.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._w is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(self.schema.empty_table(), str(self.path))
        else:
            self._w.close()


def finish_report(step: str, src, dst: Path, side_file: Path, n_in: int, n_kept: int, reasons: Counter,
                  t0: float, **extra) -> dict:
    """The JSON report every step writes beside its output; refuses counts that do not add up."""
    secs = time.perf_counter() - t0
    n_removed = sum(reasons.values())
    if n_in != n_kept + n_removed:
        raise AssertionError(f"{step}: {n_in} rows in != {n_kept} kept + {n_removed} removed")
    report = {"step": step, "input": str(src), "output": str(dst), "removed_file": str(side_file),
              "rows_in": n_in, "rows_kept": n_kept, "rows_removed": n_removed,
              "removed_by_reason": dict(sorted(reasons.items())), "seconds": round(secs, 3),
              "rows_per_s": round(n_in / secs, 1) if secs else None, "peak_rss_mb": round(peak_rss_mb(), 1),
              **extra}
    report_path(dst).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def run_filter_step(name: str, src: str | Path, dst: str | Path,
                    judge: Callable[[list[dict]], list[Optional[str]]], batch_size: int = BATCH,
                    extra: Optional[dict] = None, progress: bool = True) -> dict:
    """Apply ``judge`` batch by batch: it returns, per row, None (keep) or the removal reason (it may
    also edit rows in place). Kept rows -> ``dst``; removed rows (+ ``reason``) -> ``dst.removed.parquet``.
    A reason may carry detail after a colon ("near_duplicate_of:<id>"): the file keeps it, the
    report counts by the part before the colon."""
    src, dst = Path(src), Path(dst)
    schema = pq.ParquetFile(str(src)).schema_arrow
    kept = Writer(dst, schema)
    removed = Writer(removed_path(dst), schema.append(pa.field("reason", pa.string())))
    reasons: Counter = Counter()
    n_in = 0
    t0 = time.perf_counter()
    bar = tqdm(total=num_rows(src), desc=name, unit="row", disable=not progress, file=sys.stderr, mininterval=1)
    try:
        for batch in iter_batches(src, batch_size):
            rows = batch.to_pylist()
            verdicts = judge(rows)
            keep = [r for r, v in zip(rows, verdicts) if v is None]
            drop = [dict(r, reason=v) for r, v in zip(rows, verdicts) if v is not None]
            reasons.update(v.split(":", 1)[0] for v in verdicts if v is not None)
            kept.write_rows(keep)
            removed.write_rows(drop)
            n_in += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
        kept.close()
        removed.close()
    return finish_report(name, src, dst, removed_path(dst), n_in, kept.rows, reasons, t0, **(extra or {}))
