"""One C3PO step, as in the paper (Ring-lite §3; the ``grpo`` mode is the baseline it is compared with)."""
from __future__ import annotations

import time

import torch

from .c3po import budget_select, group_advantages, token_weights


def rl_step(s, step: int) -> dict:
    """``s``: the ``RLState`` of trainer.py (policy, reference, rollout engine, rewards, config)."""
    c, t = s.cfg, _Timer()
    prompts = s.prompts_for(step)                                           # sample prompts
    with t("generate"):
        rollouts = s.generate(prompts, step)                                # K responses each, with log-probs
    with t("reward"):
        rewards = s.score(prompts, rollouts)                                # Math-Verify / sandbox: 0 or 1
    adv = group_advantages(rewards.view(len(prompts), c.samples_per_prompt))  # GRPO group advantages
    mine = s.my_groups(rollouts, adv.flatten())                             # this DP rank's groups, prompt by prompt
    if c.drop_uninformative:                                                # all-equal groups carry no signal:
        mine = [(r, a) for r, a in mine if a != 0.0]                        #   don't spend Φ on them
    lengths = [len(r.response_ids) for r, _ in mine]
    kept = budget_select(lengths, c.token_budget) if c.mode == "c3po" else lengths  # C3PO: exactly Φ tokens
    weights, _ = token_weights(kept, c.loss_agg, c.token_budget)            # 1/Φ (or GRPO's 1/|y| mean)
    seqs = s.sequences(mine, kept, weights)                                 # prompt + kept prefix of each response
    with t("train"):
        s.add_reference_logprobs(seqs)                                      # π_ref (and π_old for >1 mini-batch)
        out = s.update(seqs)                                                # -(1/Φ)Σ(min(rA, clip(r)A) - βKL) - α_ent·H
    with t("sync"):                                                         #   (+ α_bal·balance + α_z·z-loss in the router)
        sync = s.sync_weights(step + 1)                                     # push the new weights to the engine
    return {**out, **s.rollout_metrics(prompts, rollouts, rewards, lengths, kept), **t.times, **sync,
            "tokens_per_s": sum(kept) / max(t.times["time/train"], 1e-9)}


class _Timer:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[f"time/{name}"] = time.perf_counter() - self.t0

        return _Ctx()


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)
