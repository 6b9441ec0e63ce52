"""Packed SFT rows (from ``data_tools pack``) -> megatron micro-batches.

A packed row holds several conversations back to back; ``seq_lens`` gives their lengths. Attention must
stay inside each conversation: on the CPU/local path that is a block-diagonal causal mask (True =
masked, megatron's convention); position ids restart at every boundary. Labels are the next token of
the *same* sequence, weighted by the loss mask of that label token (assistant tokens only), so the last
token of each sequence and the padding carry no loss.

(RoPE in megatron's GPTModel is applied by row position, not by ``position_ids``; inside a block the
attention scores depend only on relative positions, so a packed sequence sees exactly what it would see
alone, up to float rounding.)
"""
from __future__ import annotations

import torch


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
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for k, (a, b) in enumerate(_segments(seq_lens, L)):
        allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        position_ids[a:b] = torch.arange(b - a)
        if k < len(seq_lens) and b - a > 1:
            labels[a:b - 1] = t[a + 1:b]
            weights[a:b - 1] = m[a + 1:b]
    return {"tokens": t, "labels": labels, "loss_mask": weights, "position_ids": position_ids,
            "attention_mask": ~allowed}


def collate(samples: list[dict]) -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    out["attention_mask"] = torch.stack([s["attention_mask"] for s in samples]).unsqueeze(1)  # [b, 1, s, s]
    return out
