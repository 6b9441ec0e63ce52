"""dedup: exact (hash of the normalised question) then near-duplicate (MinHash LSH with rensa).
The first occurrence is kept; a removed row's reason names the row it duplicates."""
from __future__ import annotations

from pathlib import Path

from .io import BATCH, run_filter_step
from .schema import prompt_text
from .text import shingles, text_hash


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives + negatives around ``threshold`` — datasketch's
    own choice, so that both implementations band identically."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


class NearDupIndex:
    """Streaming near-duplicate detection: MinHash (rensa, computed per batch in Rust) + LSH banding,
    with each LSH candidate verified by its estimated Jaccard (banding alone also pairs texts well
    below the threshold, e.g. templated questions that differ in one number).
    ``check_batch`` returns, per text, the id of an earlier similar text or None (and indexes it)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 3, seed: int = 42):
        import rensa

        self._rensa = rensa
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.num_perm, self.shingle, self.seed = self.bands * self.rows, shingle, seed
        self.lsh = rensa.RMinHashLSH(threshold=threshold, num_perm=self.num_perm, num_bands=self.bands)
        self.threshold = threshold
        self.ids: list[str] = []
        self.hashes: list = []

    def check_batch(self, texts: list[str], ids: list[str]) -> list[str | None]:
        hashes = self._rensa.RMinHash.from_token_sets([shingles(t, self.shingle) for t in texts],
                                                      num_perm=self.num_perm, seed=self.seed)
        out: list[str | None] = []
        for mh, rid in zip(hashes, ids):
            hit = next((k for k in sorted(self.lsh.query(mh)) if mh.jaccard(self.hashes[k]) >= self.threshold), None)
            if hit is not None:
                out.append(self.ids[hit])
            else:
                self.lsh.insert(len(self.ids), mh)
                self.ids.append(rid)
                self.hashes.append(mh)
                out.append(None)
        return out


def dedup(src: str | Path, dst: str | Path, near: bool = True, threshold: float = 0.8, num_perm: int = 128,
          shingle: int = 3, batch_size: int = BATCH, progress: bool = True) -> dict:
    seen: dict[bytes, str] = {}
    index = NearDupIndex(threshold, num_perm, shingle) if near else None

    def judge(rows):
        verdicts: list[str | None] = []
        texts, ids, where = [], [], []
        for i, r in enumerate(rows):
            text = prompt_text(r)
            h = text_hash(text)
            if h in seen:
                verdicts.append(f"exact_duplicate_of:{seen[h]}")
                continue
            seen[h] = r["id"]
            verdicts.append(None)
            texts.append(text)
            ids.append(r["id"])
            where.append(i)
        if index is not None and texts:
            for i, hit in zip(where, index.check_batch(texts, ids)):
                if hit is not None:
                    verdicts[i] = f"near_duplicate_of:{hit}"
        return verdicts

    return run_filter_step("dedup", src, dst, judge, batch_size, progress=progress,
                             extra={"near": near, "threshold": threshold, "shingle": shingle,
                                    "lsh_bands_rows": [index.bands, index.rows] if index else None})
