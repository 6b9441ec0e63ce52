"""Packed SFT rows (from ``data_tools pack``) -> megatron micro-batches.

A packed row holds several conversations back to back; ``seq_lens`` gives their lengths. Attention must
stay inside each conversation. With Transformer Engine (GPU) a micro-batch is one THD sequence: its rows
concatenated ([1, b*L]) with ``PackedSeqParams`` (``cu_seqlens`` at every conversation boundary) and no mask
(TE's causal kernels ignore a dense mask, and a 32K row's would be 1 GiB). On the CPU/local path it is a
block-diagonal causal mask (True = masked, megatron's convention) built per micro-batch. Position ids restart
at every boundary. Labels are the next token of
the *same* sequence, weighted by the loss mask of that label token (assistant tokens only), so the last
token of each sequence and the padding carry no loss.

(RoPE in megatron's GPTModel is applied by row position, not by ``position_ids``; inside a block the
attention scores depend only on relative positions, so a packed sequence sees exactly what it would see
alone, up to float rounding.)
"""
from __future__ import annotations

import torch

from ..model.inference import thd_params


def _segments(seq_lens: list[int], length: int) -> list[tuple[int, int]]:
    segs, off = [], 0
    for n in seq_lens:
        segs.append((off, off + n))
        off += n
    if off > length:
        raise ValueError(f"seq_lens sum {off} exceeds the row length {length}")
    if off < length:
        segs.append((off, length))  # the padding tail attends only within itself (no empty softmax rows)
    return segs


def packed_row_to_sample(tokens: list[int], loss_mask: list[int], seq_lens: list[int], pad_id: int) -> dict:
    L = len(tokens)
    t = torch.tensor(tokens, dtype=torch.long)
    m = torch.tensor(loss_mask, dtype=torch.float32)
    labels = torch.full((L,), pad_id, dtype=torch.long)
    weights = torch.zeros(L)
    position_ids = torch.zeros(L, dtype=torch.long)
    segs = _segments(seq_lens, L)
    for k, (a, b) in enumerate(segs):
        position_ids[a:b] = torch.arange(b - a)
        if k < len(seq_lens) and b - a > 1:
            labels[a:b - 1] = t[a + 1:b]
            weights[a:b - 1] = m[a + 1:b]
    return {"tokens": t, "labels": labels, "loss_mask": weights, "position_ids": position_ids,
            "segments": [b - a for a, b in segs if b > a]}


def block_causal_mask(segments: list[int], length: int) -> torch.Tensor:
    """[L, L] bool, True = masked: causal attention inside each segment only."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    a = 0
    for n in segments:
        allowed[a:a + n, a:a + n] = torch.ones(n, n, dtype=torch.bool).tril()
        a += n
    return ~allowed


def collate(samples: list[dict], thd: bool = False) -> dict:
    """A micro-batch: [b, L] with a [b, 1, L, L] block mask, or (``thd``) one [1, b*L] THD sequence."""
    out = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    if not thd:
        L = out["tokens"].shape[1]
        out["attention_mask"] = torch.stack([block_causal_mask(s["segments"], L) for s in samples]).unsqueeze(1)
        return out
    out = {k: v.reshape(1, -1) for k, v in out.items()}
    out["packed_seq_params"] = thd_params([n for s in samples for n in s["segments"]])
    return out
