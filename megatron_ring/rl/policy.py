"""The policy side of the RL step on megatron-core: rollouts -> fixed-shape micro-batches cut by token
count, per-token log-probs and entropy under any TP/SP/EP/PP (vocab-parallel, differentiable), and the
forward step whose loss is ``c3po.policy_loss_terms`` weighted per the chosen aggregation."""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..model.inference import position_ids_for, thd_params
from ..parallel.dist import module_device, to_device
from .c3po import policy_loss_terms
from .logprob import logprob_and_entropy

PER_TOKEN = ("adv", "weight", "rollout_logp", "old_logp", "ref_logp")


def make_microbatches(seqs: list[dict], max_tokens: int, seq_multiple: int = 1, thd: bool = False) -> list[dict]:
    """``seqs``: {prompt_ids, response_ids (kept prefix), adv, weight, rollout_logp[, old_logp, ref_logp]}.
    Loss positions are those that predict a kept response token; per-token fields are aligned to label positions.

    Padded (``thd=False``, the local/CPU path): all micro-batches of a step share one padded length S (pipeline
    stages exchange fixed shapes); each holds max(1, max_tokens // S) rows. THD (Transformer Engine): sequences are
    packed back to back into one row of T = max(max_tokens, longest) tokens (rounded to ``seq_multiple``; every
    micro-batch the same T) with ``PackedSeqParams`` at their boundaries, so no micro-batch pads short responses
    to the longest one."""
    if not seqs:
        return []
    longest = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in seqs)
    if thd:
        T = max(max_tokens, longest)
        T += (-T) % seq_multiple
        groups, cur, used = [], [], 0
        for s in seqs:
            n = len(s["prompt_ids"]) + len(s["response_ids"])
            if cur and used + n > T:
                groups.append(cur)
                cur, used = [], 0
            cur.append(s)
            used += n
        groups.append(cur)
        return [_fill(g, 1, T, thd=True) for g in groups]
    S = longest + (-longest) % seq_multiple
    per = min(max(1, max_tokens // S), len(seqs))  # every micro-batch has `per` rows (fixed PP shapes)
    return [_fill(seqs[i:i + per], per, S) for i in range(0, len(seqs), per)]


def _fill(chunk: list[dict], rows: int, S: int, thd: bool = False) -> dict:
    b = {"tokens": torch.zeros(rows, S, dtype=torch.long), "labels": torch.zeros(rows, S, dtype=torch.long),
         "loss_mask": torch.zeros(rows, S), "position_ids": torch.zeros(rows, S, dtype=torch.long)}
    for k in PER_TOKEN:
        if k in chunk[0]:
            b[k] = torch.zeros(rows, S)
    lens, off = [], 0
    for j, s in enumerate(chunk):
        p, r = s["prompt_ids"], s["response_ids"]
        row, a = (0, off) if thd else (j, 0)
        seq = torch.tensor(p + r, dtype=torch.long)
        n = len(seq)
        b["tokens"][row, a:a + n] = seq
        b["labels"][row, a:a + n - 1] = seq[1:]
        b["position_ids"][row, a:a + n] = torch.arange(n)
        lo, hi = a + len(p) - 1, a + len(p) - 1 + len(r)  # positions whose label is a response token
        b["loss_mask"][row, lo:hi] = 1.0
        b["adv"][row, lo:hi] = float(s["adv"])
        b["weight"][row, lo:hi] = float(s["weight"])
        for k in ("rollout_logp", "old_logp", "ref_logp"):
            if k in s:
                b[k][row, lo:hi] = torch.as_tensor(s[k][:len(r)], dtype=torch.float32)
        lens.append(n)
        off += n
    if not thd:
        b["position_ids"] = position_ids_for(b["tokens"])
        return b
    if off < S:  # the padding tail is a segment of its own
        lens.append(S - off)
        b["position_ids"][0, off:] = torch.arange(S - off)
    b["packed_seq_params"] = thd_params(lens)
    return b


def empty_like(mb: dict) -> dict:
    """A micro-batch with no loss tokens (keeps the micro-batch count equal across DP/EP ranks)."""
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) and k != "position_ids" else v
            for k, v in mb.items()}


def rl_forward_step(cfg: dict):
    """A megatron forward_step: the C3PO/GRPO loss of one micro-batch. ``cfg``: clip_eps, kl_coef, kl_kind,
    entropy_coef, temperature, tis_cap (None: off), denominators (an iterator of the per-micro-batch share
    of the loss denominator)."""

    def step(data_iter, model):
        b = to_device(next(data_iter), module_device(model))  # built on the host, run where the model is
        logits = model(b["tokens"], b["position_ids"], None, packed_seq_params=b.get("packed_seq_params"))

        def loss_func(logits):
            # log-probs and entropy at the sampling temperature, keeping only the logits for the backward
            logp, ent = logprob_and_entropy(logits, b["labels"], cfg["temperature"])
            mask = b["loss_mask"]
            old = b["old_logp"] if "old_logp" in b else logp.detach()
            tis = None
            if cfg.get("tis_cap"):
                tis = torch.clamp(torch.exp(old - b["rollout_logp"]), max=cfg["tis_cap"]) * mask
            t = policy_loss_terms(logp, old, b.get("ref_logp"), b["adv"], clip_eps=cfg["clip_eps"],
                                  kl_coef=cfg["kl_coef"] if "ref_logp" in b else 0.0, kl_kind=cfg["kl_kind"],
                                  entropy=ent, entropy_coef=cfg["entropy_coef"], tis_weight=tis)
            w = b["weight"] * mask
            n = mask.sum()
            denom = torch.tensor(int(round(next(cfg["denominators"]))), dtype=torch.int, device=logits.device)
            mismatch = ((logp.detach() - b["rollout_logp"]).abs() * mask).sum()
            report = {"pg loss": torch.stack([(t["loss"].detach() * w).sum(), denom.float()]),
                      "kl": torch.stack([(t["kl"] * mask).sum(), n]),
                      "entropy": torch.stack([(t["entropy"] * mask).sum(), n]),
                      "clipfrac": torch.stack([(t["clipped"] * mask).sum(), n]),
                      "logp_mismatch": torch.stack([mismatch, n])}
            return (t["loss"] * w).sum(), denom, report

        return logits, loss_func

    return step


@torch.no_grad()
def score_logprobs(model: torch.nn.Module, mbs: list[dict], temperature: float = 1.0) -> list[torch.Tensor] | None:
    """Per-token log-probs [b, S] of each micro-batch (forward only; the old policy or the reference).
    Returns None on pipeline stages other than the last."""
    got: list[torch.Tensor] = []

    def step(data_iter, chunk):
        b = to_device(next(data_iter), module_device(chunk))
        out = chunk(b["tokens"], b["position_ids"], None, packed_seq_params=b.get("packed_seq_params"))

        def keep(logits):
            got.append(logprob_and_entropy(logits, b["labels"], temperature)[0])
            return logits.new_zeros(()), {}

        return out, keep

    was = model.training
    model.eval()
    get_forward_backward_func()(forward_step_func=step, data_iterator=iter(mbs), model=[model],
                                num_microbatches=len(mbs), seq_length=mbs[0]["tokens"].shape[1],
                                micro_batch_size=mbs[0]["tokens"].shape[0], forward_only=True)
    model.train(was)
    return got if ps.is_pipeline_last_stage(ignore_virtual=True) else None
