"""mix: sample rows to domain ratios (default the Ring-lite SFT mix: math 64.5 / code 25.5 /
science 9.2 / other 0.8). Two streaming passes; pass 1 keeps only (domain, hash) per row. Without a
target size the largest mix that needs no up-sampling is taken."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

from .io import BATCH, iter_batches, run_filter_step

RING_LITE_SFT_MIX = {"math": 64.5, "code": 25.5, "science": 9.2, "other": 0.8}


def _key(rid: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest(), "big")


def mix(src: str | Path, dst: str | Path, ratios: dict[str, float] | None = None, total: int | None = None,
        seed: int = 0, batch_size: int = BATCH, progress: bool = True) -> dict:
    ratios = dict(ratios or RING_LITE_SFT_MIX)
    s = sum(ratios.values())
    ratios = {k: v / s for k, v in ratios.items() if v > 0}
    bucket = lambda d: d if d in ratios else "other"  # noqa: E731
    keys: dict[str, list[int]] = defaultdict(list)
    for b in iter_batches(src, 65536):
        for rid, dom in zip(b.column("id").to_pylist(), b.column("domain").to_pylist()):
            keys[bucket(dom)].append(_key(rid, seed))
    avail = {d: len(keys.get(d, [])) for d in ratios}
    present = {d: r for d, r in ratios.items() if avail[d]}
    if not present:
        raise ValueError(f"{src}: no rows in any domain of {sorted(ratios)}")
    max_total = int(min(avail[d] / r for d, r in present.items()))
    total = min(total or max_total, max_total)
    quota = {d: int(round(total * r)) for d, r in present.items()}
    cut = {}
    for d, q in quota.items():
        ks = sorted(keys[d])
        cut[d] = ks[q - 1] if q else -1
    del keys

    def judge(rows):
        out = []
        for r in rows:
            d = bucket(r["domain"])
            out.append(None if d in cut and _key(r["id"], seed) <= cut[d] else f"over_quota:{d}")
        return out

    return run_filter_step("mix", src, dst, judge, batch_size, progress=progress,
                           extra={"ratios": ratios, "available": avail, "quota": quota, "total": sum(quota.values())})
