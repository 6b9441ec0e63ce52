"""Run under torchrun: does the RL step move the policy toward what is rewarded? A synthetic verifiable reward
(1 when the response's first token id is even) on the tiny random model gives mixed rewards from the first step.
The probability mass the policy puts on even first tokens (over fixed prompts, the rollout engine's synced copy)
is measured before and after a few full ``rl_step``s (generate -> rewards -> GRPO advantages -> drop all-equal
groups -> C3PO budget -> π_ref/π_old -> 2 mini-batches with TIS -> sync). With ``--no-signal-on-odd-prompts``
the odd prompts (all on DP rank 1 under DP2) score 0 whatever is sampled: their groups are dropped and that rank
trains on nothing. Writes a JSON report (rank 0)."""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", required=True, help="the run folder (shared by the ranks: weight sync scratch)")
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--no-signal-on-odd-prompts", action="store_true")
    a = ap.parse_args()

    import torch.distributed as dist

    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.rl.config import rl_config
    from megatron_ring.rl.step import as_tensor, rl_step
    from megatron_ring.rl.trainer import RLState

    recipe = load_recipe("rl_stage1_tiny", {"parallel": {"expert_model_parallel_size": a.ep}})
    cfg = rl_config(recipe, init=a.init, prompts=f"{a.data}/rl_stage1/4_filtered.parquet",
                    tokenizer=f"{a.data}/tokenizer", out=a.work, eval_sets=[], prompts_per_step=8,
                    samples_per_prompt=8, max_new_tokens=6, token_budget=192, mini_batches=2, tis_cap=2.0,
                    drop_uninformative=True, lr=a.lr, lr_overrides={}, save_interval=0, reward_workers=1)
    s = RLState(recipe, cfg)

    def score(prompts, rollouts):
        v = []
        for r in rollouts:
            r.reward = float(r.response_ids[0] % 2 == 0)
            if a.no_signal_on_odd_prompts and r.prompt_index % 2 == 1:
                r.reward = 0.0
            r.reward_reason = "synthetic"
            v.append(r.reward)
        return as_tensor(v)

    s.score, s.tb = score, None
    trained_on, update = [], s.update  # the sequences each rank trains on, per step

    def counted_update(seqs):
        trained_on.append(len(seqs))
        return update(seqs)

    s.update = counted_update
    probe = s.encode(s.rows[:16])

    def even_mass() -> float:
        if not s.rank0:
            return 0.0
        m, tot = s.engine.model, 0.0
        with torch.no_grad():
            for ids in probe:
                p = m(torch.tensor([ids]), use_cache=False).logits[0, -1].float().softmax(-1)
                tot += float(p[0::2].sum())
        return tot / len(probe)

    before, steps = even_mass(), []
    for step in range(a.steps):
        m = rl_step(s, step)
        s.step = step + 1
        steps.append({k: m.get(k) for k in ("reward/mean", "grad_norm", "tokens/kept", "clipfrac", "skipped")})
    after = even_mass()
    if s.pool is not None:
        s.pool.close()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, trained_on)
    if dist.get_rank() == 0:
        json.dump({"even_mass_before": before, "even_mass_after": after, "steps": steps,
                   "sequences_trained_per_rank": per_rank}, open(a.out, "w"))


if __name__ == "__main__":
    main()
