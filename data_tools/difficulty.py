"""difficulty filter: from Parquets of rollouts (``id``, ``reward``; one file, or the shards of
``megatron-ring rollouts --shard``) compute each prompt's pass rate and drop the all-solved (too easy) and
never-solved (too hard) ones; kept rows get ``difficulty = 1 - pass_rate``."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from .io import BATCH, run_filter_step


def pass_rates(rollouts: str | Path | list, id_field: str = "id", reward_field: str = "reward") -> dict[str, float]:
    files = rollouts if isinstance(rollouts, (list, tuple)) else [rollouts]
    tot: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for f in files:
        pf = pq.ParquetFile(str(f))
        missing = {id_field, reward_field} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{f}: rollouts need columns {sorted(missing)}")
        for b in pf.iter_batches(batch_size=65536, columns=[id_field, reward_field]):
            for i, r in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
                t = tot[str(i)]
                t[0] += float(r > 0.5)
                t[1] += 1
    return {k: s / n for k, (s, n) in tot.items()}


def difficulty_filter(src: str | Path, dst: str | Path, rollouts: str | Path | list, keep_unrated: bool = True,
                      batch_size: int = BATCH, progress: bool = True) -> dict:
    rates = pass_rates(rollouts)

    def judge(rows):
        out = []
        for r in rows:
            p = rates.get(r["id"])
            if p is None:
                out.append(None if keep_unrated else "no_rollouts")
            elif p >= 1.0:
                out.append("all_solved")
            elif p <= 0.0:
                out.append("never_solved")
            else:
                if "difficulty" in r:
                    r["difficulty"] = 1.0 - p
                out.append(None)
        return out

    return run_filter_step("difficulty", src, dst, judge, batch_size, progress=progress,
                           extra={"rated_prompts": len(rates), "keep_unrated": keep_unrated})
