"""Diagnostic: how much of one RL step's policy gradient is signal? (sizes the batch RL needs on a model)

    .venv/bin/python benchmarks/rl_grad_snr.py --init runs/tiny/sft [--batches 4] [--prompts 32] [--k 8]

At one checkpoint, computes the C3PO policy gradient (the same selection, loss and megatron backward as
``megatron-ring rl``, no optimizer step) on ``--batches`` independent rollout batches (different prompts and
sampling seeds). For two independent estimates g₁, g₂ = μ + noise, E[g₁·g₂] = |μ|² and E|g|² = |μ|² + tr Σ/B, so
the mean pairwise cosine c estimates the batch's signal-to-noise ratio SNR_B = c / (1 − c), and a batch of
B·(1 − c)/c · s samples would have SNR s. Prints, per parameter group and in total: |g|, the mean pairwise cosine,
SNR_B and the samples needed for SNR 1 — side by side with the reward of each batch.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _rl_args import rl_run_parser  # noqa: E402  (benchmarks/, this script's folder)


def groups_of(name: str) -> str:
    for key in ("embedding", "output_layer", "router", "experts", "shared_experts", "self_attention",
                "final_layernorm"):
        if key in name:
            return key
    return "other"


def batch_grad(s, step: int):
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ring.rl.c3po import budget_select, group_advantages, token_weights
    from megatron_ring.rl.policy import rl_forward_step

    c = s.cfg
    prompts = s.prompts_for(step)
    rollouts = s.generate(prompts, step)
    rewards = s.score(prompts, rollouts)
    adv = group_advantages(rewards.view(len(prompts), c.samples_per_prompt))
    mine = [(r, a) for r, a in s.my_groups(rollouts, adv.flatten()) if a != 0.0]
    lengths = [len(r.response_ids) for r, _ in mine]
    kept = budget_select(lengths, c.token_budget) if c.mode == "c3po" else lengths
    weights, _ = token_weights(kept, c.loss_agg, c.token_budget)
    seqs = s.sequences(mine, kept, weights)
    s.add_reference_logprobs(seqs)
    s.ddp.zero_grad_buffer()
    for mbs, part in s.minis:
        get_forward_backward_func()(forward_step_func=rl_forward_step(s.loss_config(part, len(mbs))), data_iterator=iter(mbs), model=[s.ddp],
                                    num_microbatches=len(mbs), seq_length=mbs[0]["tokens"].shape[1],
                                    micro_batch_size=mbs[0]["tokens"].shape[0], forward_only=False)
    grads = {}
    for name, p in s.ddp.module.named_parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None:
            grads.setdefault(groups_of(name), []).append(g.detach().flatten().clone().double())
    grads = {k: torch.cat(v) for k, v in grads.items()}
    grads["all"] = torch.cat([grads[k] for k in sorted(grads)])
    informative = len(mine) // c.samples_per_prompt
    return grads, float(rewards.mean()), informative, sum(kept)


def main() -> None:
    ap = rl_run_parser(batches=4, prompts=32, k=8, budget=8192)
    ap.add_argument("--temperature", type=float, default=None)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.rl.config import rl_config
    from megatron_ring.rl.trainer import RLState

    recipe = load_recipe(a.recipe)
    with tempfile.TemporaryDirectory() as td:
        cfg = rl_config(recipe, init=a.init, prompts=a.prompts_file, tokenizer=a.tokenizer, out=td,
                        prompts_per_step=a.prompts, samples_per_prompt=a.k, token_budget=a.budget,
                        temperature=a.temperature, eval_sets=[])
        s = RLState(recipe, cfg)
        runs = [batch_grad(s, step) for step in range(a.batches)]
        s.pool.close()
    B = a.prompts * a.k
    print(f"\nPolicy-gradient SNR at {a.init}: {a.batches} independent batches of {a.prompts} prompts × {a.k} "
          f"(T {cfg.temperature}, Φ {a.budget})")
    print("batch rewards: " + ", ".join(f"{r:.3f} ({n} informative groups, {t} tokens)" for _, r, n, t in runs))
    print(f"\n{'params':<16} {'size':>9} {'|g| mean':>10} {'cos mean':>9} {'cos min':>8} {'SNR_B':>7} "
          f"{'samples for SNR 1':>18}")
    print("-" * 84)
    rows = {}
    for key in runs[0][0]:
        gs = [r[0][key] for r in runs]
        cos = [float(torch.nn.functional.cosine_similarity(x, y, dim=0)) for x, y in itertools.combinations(gs, 2)]
        cm = statistics.mean(cos)
        snr = cm / (1 - cm) if 0 < cm < 1 else float("nan")
        need = B / snr if snr == snr and snr > 0 else float("inf")
        rows[key] = {"size": gs[0].numel(), "norm": statistics.mean(float(g.norm()) for g in gs), "cos": cm,
                     "cos_min": min(cos), "snr": snr, "samples_for_snr1": need}
        print(f"{key:<16} {gs[0].numel():>9} {rows[key]['norm']:>10.4g} {cm:>9.4f} {min(cos):>8.4f} {snr:>7.3f} "
              f"{need:>18.0f}")
    print(json.dumps({"batch_samples": B, "groups": rows}))


if __name__ == "__main__":
    main()
