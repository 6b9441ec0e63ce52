"""Run under torchrun: the micro-batched, distributed C3PO loss of the megatron policy equals the
whole-batch ``reference_loss`` on the same log-probs, with π_old ≠ π_θ (old log-probs shifted per token, so the
ratio moves and some tokens clip); its gradient norm equals that of autograd through the reference loss on the HF
model with the same weights (an independent implementation); the vocab-parallel entropy equals the entropy of
the gathered full-vocab logits; the weight sync gathers the exact HF state. Writes a JSON report (rank 0)."""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--ref", required=True, help="another checkpoint, the reference policy")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--agg", default="c3po")
    ap.add_argument("--hf", required=True, help="the HF export of --ckpt")
    a = ap.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ring.checkpoint import load_checkpoint
    from megatron_ring.config.recipe import ParallelConfig, PrecisionConfig, Recipe
    from megatron_ring.convert.hf_io import read_hf_state
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.model.inference import forward_logits
    from megatron_ring.parallel.dist import init_distributed
    from megatron_ring.rl.c3po import budget_select, reference_loss, token_weights
    from megatron_ring.rl.policy import make_microbatches, rl_forward_step, score_logprobs
    from megatron_ring.rl.weights import stream_hf_weights
    from megatron_ring.training.core import OptimConfig, build_optimizer, train_step, wrap_ddp

    cfg = load_hf_config(a.ckpt)
    recipe = Recipe(name="t", hf_config=cfg, precision=PrecisionConfig(transformer_impl="local"),
                    parallel=ParallelConfig(tensor_model_parallel_size=a.tp, expert_model_parallel_size=a.ep))
    init_distributed(recipe.parallel, seed=7)
    model, ref = build_model(recipe), build_model(recipe)
    load_checkpoint(model, a.ckpt, cfg)
    load_checkpoint(ref, a.ref, cfg)
    ddp = wrap_ddp(model)
    opt = build_optimizer([ddp], OptimConfig(lr=1e-3))
    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    # the trainer's gathered HF state == the HF folder exported from the same checkpoint
    hf = {}
    stream_hf_weights(model, cfg, lambda named: hf.update(named), bucket_bytes=1 << 20)
    sync_ok = None
    if dist.get_rank() == 0:
        want = read_hf_state(a.hf)
        sync_ok = sorted(hf) == sorted(want) and all(torch.equal(hf[k], want[k]) for k in want)

    g = torch.Generator().manual_seed(11)
    V = cfg["vocab_size"]
    groups = []  # 4 prompts x 3 responses, split over DP ranks by prompt
    for p in range(4):
        prompt = torch.randint(2, V, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        for k in range(3):
            n = int(torch.randint(4, 20, (1,), generator=g))
            groups.append((p, prompt, torch.randint(2, V, (n,), generator=g).tolist(), float(torch.randn(1, generator=g))))
    mine = [x for x in groups if x[0] % dp == dpr]
    phi = 40
    kept = budget_select([len(r) for _, _, r, _ in mine], phi)
    w, denom = token_weights(kept, a.agg, phi)
    seqs = [{"prompt_ids": pr, "response_ids": r[:k], "adv": adv, "weight": wi, "rollout_logp": [0.0] * k}
            for (_, pr, r, adv), k, wi in zip(mine, kept, w) if k]
    mbs = make_microbatches(seqs, max_tokens=64, seq_multiple=a.tp)  # several micro-batches
    lp_ref = score_logprobs(ref, mbs)
    lp_cur = score_logprobs(model, mbs)
    # π_old ≠ π_θ: shift the old log-probs per token by U(-0.4, 0.4), so ratios spread around 1 and some clip
    gs = torch.Generator().manual_seed(100 + dpr)
    lp_old = [lp + (torch.rand(lp.shape, generator=gs) - 0.5) * 0.8 for lp in lp_cur]
    for b, lr_, lo_ in zip(mbs, lp_ref, lp_old):
        b["ref_logp"], b["old_logp"] = lr_, lo_
    # per-response token log-probs for the reference computation
    resp_lp, resp_old, resp_ref, advs, ks = [], [], [], [], []
    per = mbs[0]["tokens"].shape[0]
    for i, s in enumerate(seqs):
        b, j = divmod(i, per)
        lo, k = len(s["prompt_ids"]) - 1, len(s["response_ids"])
        resp_lp.append(lp_cur[b][j, lo:lo + k])
        resp_old.append(lp_old[b][j, lo:lo + k])
        resp_ref.append(lp_ref[b][j, lo:lo + k])
        advs.append(s["adv"])
        ks.append(k)
    w_kept = [wi for wi, k in zip(w, kept) if k]
    want = reference_loss(resp_lp, resp_old, resp_ref, advs, ks, agg=a.agg, budget=phi, clip_eps=0.2, kl_coef=0.1)
    # the same loss by autograd on the HF model (same weights, independent code): this rank's share of the gradient
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(a.hf, trust_remote_code=True, dtype=torch.float32)
    hf_lp = []
    for s in seqs:
        ids = torch.tensor([s["prompt_ids"] + s["response_ids"]])
        lo, k = len(s["prompt_ids"]) - 1, len(s["response_ids"])
        lps = hf_model(ids, use_cache=False).logits[0].float().log_softmax(-1)
        hf_lp.append(lps[lo:lo + k].gather(-1, ids[0, lo + 1:lo + 1 + k, None])[:, 0])
    (reference_loss(hf_lp, resp_old, resp_ref, advs, ks, agg=a.agg, budget=phi, clip_eps=0.2, kl_coef=0.1)
     * denom).backward()
    # (an expert no token of this rank reached has no .grad: zeros keep the vectors aligned across ranks)
    g_hf = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for p in hf_model.parameters()])
    dist.all_reduce(g_hf, group=ps.get_data_parallel_group())
    if a.agg == "seq-mean-token-mean":
        assert all(abs(x - 1 / k) < 1e-12 for x, k in zip(w_kept, ks))
    # entropy of the policy on the response positions, from gathered full logits
    ent_num = ent_den = 0.0
    for b in mbs:
        full = forward_logits(model, b["tokens"])
        lp = full.log_softmax(-1)
        ent = -(lp.exp() * lp).sum(-1)
        ent_num += float((ent * b["loss_mask"]).sum())
        ent_den += float(b["loss_mask"].sum())
    fcfg = {"clip_eps": 0.2, "kl_coef": 0.1, "kl_kind": "k3", "entropy_coef": 0.0, "temperature": 1.0,
            "tis_cap": None, "denominators": iter([denom] + [0.0] * (len(mbs) - 1))}
    out = train_step([ddp], opt, mbs, len(mbs), mbs[0]["tokens"].shape[1], per, forward_step=rl_forward_step(fcfg),
                     report_keys=("pg loss", "kl", "entropy", "clipfrac"))
    # every DP rank's reference loss, combined as megatron combines them: Σ numerators / Σ denominators
    t = torch.tensor([float(want) * denom, denom, ent_num, ent_den])
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    if dist.get_rank() == 0:
        json.dump({"pg_loss": out["pg_loss"], "reference": float(t[0] / t[1]), "entropy": out["entropy"],
                   "grad_norm_reference": float(g_hf.norm() / t[1]), "clipfrac": out["clipfrac"],
                   "entropy_full_logits": float(t[2] / t[3]), "kl": out["kl"], "grad_norm": out["grad_norm"],
                   "sync_ok": sync_ok, "microbatches": len(mbs)}, open(a.out, "w"))


if __name__ == "__main__":
    main()
