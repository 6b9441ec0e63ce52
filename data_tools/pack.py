"""tokenize + pack: SFT rows -> chat-template token ids with the loss on assistant tokens only
(the ``<think>`` part included), packed first-fit into fixed-length rows. Each packed row records its
sequence lengths so the trainer can keep attention inside each sequence."""
from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from megatron_ring.tokenizer import chat_segments, load_tokenizer

from .io import BATCH, Writer, finish_report, iter_batches, num_rows, removed_path

PACKED_SCHEMA = pa.schema([("tokens", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                           ("seq_lens", pa.list_(pa.int32())), ("ids", pa.list_(pa.string()))])


def tokenize_chats(tok, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """Token ids and loss mask per conversation; all pieces of a batch go to the tokenizer in one call."""
    segs = [chat_segments(m) for m in conversations]
    flat = [t for s in segs for t, _ in s]
    fast = getattr(tok, "backend_tokenizer", None)  # the Rust tokenizer: skips per-item Python conversion
    if fast is not None:
        enc = [e.ids for e in fast.encode_batch(flat, add_special_tokens=False)] if flat else []
    else:
        enc = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for s in segs:
        ids, mask = [], []
        for _, trained in s:
            ids += enc[k]
            mask += [int(trained)] * len(enc[k])
            k += 1
        out.append((ids, mask))
    return out


class Packer:
    """First-fit packing over a bounded set of open rows (memory stays bounded)."""

    def __init__(self, seq_len: int, pad_id: int, open_rows: int = 32):
        self.seq_len, self.pad_id, self.open_rows = seq_len, pad_id, open_rows
        self.bins: list[dict] = []

    def add(self, ids, mask, rid) -> list[dict]:
        done = []
        for b in self.bins:
            if b["used"] + len(ids) <= self.seq_len:
                break
        else:
            b = {"tokens": [], "loss_mask": [], "seq_lens": [], "ids": [], "used": 0}
            self.bins.append(b)
            if len(self.bins) > self.open_rows:
                fullest = max(self.bins[:-1], key=lambda x: x["used"])
                self.bins.remove(fullest)
                done.append(self._close(fullest))
        b["tokens"] += ids
        b["loss_mask"] += mask
        b["seq_lens"].append(len(ids))
        b["ids"].append(rid)
        b["used"] += len(ids)
        if b["used"] == self.seq_len:
            self.bins.remove(b)
            done.append(self._close(b))
        return done

    def flush(self) -> list[dict]:
        out = [self._close(b) for b in self.bins]
        self.bins = []
        return out

    def _close(self, b):
        pad = self.seq_len - b["used"]
        return {"tokens": b["tokens"] + [self.pad_id] * pad, "loss_mask": b["loss_mask"] + [0] * pad,
                "seq_lens": b["seq_lens"], "ids": b["ids"]}


def pack(src: str | Path, dst: str | Path, tokenizer: str | Path, seq_len: int = 2048, open_rows: int = 32,
         batch_size: int = BATCH, progress: bool = True) -> dict:
    src, dst = Path(src), Path(dst)
    tok = load_tokenizer(tokenizer)
    packer = Packer(seq_len, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, open_rows)
    out = Writer(dst, PACKED_SCHEMA)
    removed = Writer(removed_path(dst), pq.ParquetFile(str(src)).schema_arrow.append(pa.field("reason", pa.string())))
    reasons: Counter = Counter()
    n_in = n_packed = tokens = trained = 0
    t0 = time.perf_counter()
    bar = tqdm(total=num_rows(src), desc="pack", unit="seq", disable=not progress, file=sys.stderr, mininterval=1)
    try:
        for batch in iter_batches(src, batch_size):
            rows, drop, done = batch.to_pylist(), [], []
            for r, (ids, mask) in zip(rows, tokenize_chats(tok, [r["messages"] for r in rows])):
                if len(ids) > seq_len:
                    drop.append(dict(r, reason=f"too_long:{len(ids)}>{seq_len}"))
                    reasons["too_long"] += 1
                    continue
                if not any(mask):
                    drop.append(dict(r, reason="no_trained_tokens"))
                    reasons["no_trained_tokens"] += 1
                    continue
                n_packed += 1
                tokens += len(ids)
                trained += sum(mask)
                done += packer.add(ids, mask, r["id"])
            n_in += len(rows)
            out.write_rows(done)
            removed.write_rows(drop)
            bar.update(len(rows))
        out.write_rows(packer.flush())
    finally:
        bar.close()
        out.close()
        removed.close()
    return finish_report("pack", src, dst, removed_path(dst), n_in, n_packed, reasons, t0, packed_rows=out.rows,
                         seq_len=seq_len, tokens=tokens, trained_tokens=trained,
                         fill=round(tokens / max(1, out.rows * seq_len), 4))
