"""Per-token log π(label) and entropy from vocab-parallel logits in one autograd function that keeps only the logits.

The plain composition (``logits.float() / T``, megatron's vocabulary-parallel cross-entropy on a copy, then
``exp``, ``e * z`` for the entropy) leaves autograd holding about six fp32 copies of the [tokens, vocab / TP] logits:
~25 GiB per rank for a 32K-token micro-batch of Ling-lite at TP4, the largest term of the RL memory plan. Here the
forward and the backward walk the tokens in chunks, and what is kept for the backward is the logits as they came
(bf16 on a GPU) plus three numbers per token: log Z, E_p[z] and the label's position. The backward recomputes p.

With z = logits / T over the full vocabulary (each TP rank holds a slice: the max and the sums are all-reduced):
    log p(y) = z_y - log Z,                 d/dz = onehot(y) - p
    H        = log Z - E_p[z],              d/dz = -p (z - E_p[z])
and d/dlogits = d/dz / T. No all-reduce in the backward: log Z and E_p[z] are global already (as megatron's own
vocab-parallel cross-entropy)."""
from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_TOKENS = 1024  # fp32 temporaries: a few [CHUNK_TOKENS, vocab / TP] at a time (~0.5 GiB for Ling-lite at TP4)


def _tp():
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None, 0, 1
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_world_size()


class _LogpEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature: float, chunk: int):
        group, rank, size = _tp()
        V = logits.shape[-1]
        flat, lab = logits.reshape(-1, V), labels.reshape(-1)
        n = flat.shape[0]
        local = lab - rank * V  # the label's index in this rank's vocabulary slice
        mine = (local >= 0) & (local < V)
        local = torch.where(mine, local, torch.zeros_like(local))
        # the max in the logits' own dtype (no fp32 copy): converting and dividing by T > 0 keep the order, so this is
        # exactly the max of z
        m = flat.amax(-1).float() / temperature
        if size > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        stats = torch.zeros(3, n, dtype=torch.float32, device=flat.device)  # sum e, sum e*z, z_label
        for i in range(0, n, chunk):
            z = flat[i:i + chunk].float() / temperature
            e = (z - m[i:i + chunk, None]).exp_()
            stats[0, i:i + chunk] = e.sum(-1)
            stats[1, i:i + chunk] = (e * z).sum(-1)
            stats[2, i:i + chunk] = z.gather(-1, local[i:i + chunk, None]).squeeze(-1) * mine[i:i + chunk]
        if size > 1:
            dist.all_reduce(stats, group=group)
        log_z = m + stats[0].log()
        mean_z = stats[1] / stats[0]
        ctx.save_for_backward(logits, local, mine, log_z, mean_z)
        ctx.temperature, ctx.chunk = temperature, chunk
        return (stats[2] - log_z).view(labels.shape), (log_z - mean_z).view(labels.shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, local, mine, log_z, mean_z = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        V = logits.shape[-1]
        flat = logits.reshape(-1, V)
        n = flat.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=flat.device)
        g_logp = zeros if g_logp is None else g_logp.reshape(-1).float()
        g_ent = zeros if g_ent is None else g_ent.reshape(-1).float()
        grad = torch.empty_like(logits)
        gflat = grad.view(-1, V)
        for i in range(0, n, chunk):
            s = slice(i, i + chunk)
            z = flat[s].float() / T
            p = (z - log_z[s, None]).exp_()
            gz = -p * (g_logp[s, None] + g_ent[s, None] * (z - mean_z[s, None]))
            gz.scatter_add_(-1, local[s, None], (g_logp[s] * mine[s])[:, None])
            gflat[s] = gz.div_(T).to(grad.dtype)
        return grad, None, None, None


def logprob_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(label), entropy), each shaped like ``labels``, float32, differentiable with respect to ``logits``
    ([..., vocab / TP], this rank's vocabulary slice)."""
    return _LogpEntropy.apply(logits, labels, float(temperature), int(chunk))
