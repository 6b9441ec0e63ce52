"""An independent reference for megatron's training step: the HF model (plain PyTorch autograd) and
``torch.optim.AdamW`` on the same weights and batch, with megatron-core 0.19's objective written out:

    J = [ sum_mb ( sum_t mask*CE  +  sum_MoE-layers (aux_mb + z_mb) * T_mb ) ] / N

N = loss tokens of the global batch, T_mb = tokens of the micro-batch (the router sees every position),
aux_mb = E*c_aux/(k*T_mb^2) * sum_e P_e * f_e (switch load balancing: P = summed softmax scores over all
experts, f = tokens routed to e by the top-k), z_mb = c_z * mean_t logsumexp(router logits)^2.
No weight decay on 1-D parameters (megatron's standard override); gradient clipping by the global norm."""
from __future__ import annotations

import torch


def hf_adamw_steps(hf_dir, tokens: torch.Tensor, mask: torch.Tensor, steps: int, micro_batch: int, lr: float,
                   aux_coeff: float, z_coeff: float, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
                   clip: float = 1.0) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).train()
    cfg = model.config
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=betas, eps=eps)
    logits_seen: list[torch.Tensor] = []
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert gates, "no MoE router found in the HF model"
    for g in gates:
        g.register_forward_hook(lambda mod, inp, out: logits_seen.append(out[2]))
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    n_loss = mask.sum()
    hist = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        ce_total = 0.0
        for i in range(0, tokens.shape[0], micro_batch):
            ids, m = tokens[i:i + micro_batch], mask[i:i + micro_batch]
            logits_seen.clear()
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
            ce_sum = (ce * m.flatten()).sum()
            router = 0.0
            for lg in logits_seen:  # [T, E] fp32
                T = lg.shape[0]
                probs = lg.softmax(-1)
                routed = torch.zeros(E).index_add_(0, probs.topk(k, -1).indices.flatten(), torch.ones(T * k))
                aux = (probs.sum(0) * routed).sum() * (E * aux_coeff / (k * T * T))
                z = z_coeff * torch.logsumexp(lg, -1).square().mean()
                router = router + (aux + z) * T
            ((ce_sum + router) / n_loss).backward()
            ce_total += float(ce_sum.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        hist.append({"loss": ce_total / float(n_loss), "grad_norm": float(norm)})
    return hist
