"""The algorithm of Ring-lite's RL stage, as pure tensor functions (no model, no distribution):
GRPO group advantages, C3PO's token-budget selection, KL estimators, the clipped policy objective, and
the loss aggregations (C3PO's 1/Φ, and GRPO's per-response token mean for side-by-side comparison)."""
from __future__ import annotations

import torch

LOSS_AGG = ("c3po", "token-mean", "seq-mean-token-mean")


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean R) / std R over the K responses of one prompt. rewards: [prompts, K].
    A group whose responses all score the same gets advantage 0 (it carries no signal)."""
    r = rewards.float()
    mean, std = r.mean(dim=1, keepdim=True), r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
    return (r - mean) / (std + eps)


def budget_select(lengths: list[int], budget: int) -> list[int]:
    """C3PO token-budget selection. ``lengths`` are the response lengths flattened prompt by prompt
    (all K responses of prompt 0, then prompt 1, ...). Tokens are kept in that order until the budget Φ is
    met: the response that crosses Φ keeps only its prefix, the responses after it are dropped.
    Returns the number of kept tokens of each response (sum == min(Φ, Σ lengths))."""
    kept, left = [], budget
    for n in lengths:
        k = min(n, max(left, 0))
        kept.append(k)
        left -= k
    return kept


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) estimators on samples from π (Schulman's k1 and low-variance k3)."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl estimator {kind!r}: expected 'k1' or 'k3'")


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate min(r·A, clip(r, 1-ε, 1+ε)·A) with r = π_θ/π_old, and whether it clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    return torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def token_weights(kept: list[int], agg: str, budget: int | None = None) -> tuple[list[float], float]:
    """(weight of each response's tokens, the loss's denominator) so that
    loss = -Σ_tokens weight·term / denominator reproduces the aggregation:
      c3po                 1/Φ: weight 1, denominator Φ (constant: gradient scale independent of the samples)
      token-mean           weight 1, denominator Σ kept tokens
      seq-mean-token-mean  weight 1/|y_i|, denominator the number of responses (GRPO's original form)"""
    if agg == "c3po":
        if not budget:
            raise ValueError("loss aggregation 'c3po' needs a token budget Φ > 0")
        return [1.0] * len(kept), float(budget)
    if agg == "token-mean":
        return [1.0] * len(kept), float(max(sum(kept), 1))
    if agg == "seq-mean-token-mean":
        return [1.0 / k if k else 0.0 for k in kept], float(max(sum(1 for k in kept if k), 1))
    raise ValueError(f"loss aggregation {agg!r}: expected one of {LOSS_AGG}")


def policy_loss_terms(logp, old_logp, ref_logp, adv, *, clip_eps: float, kl_coef: float, kl_kind: str = "k3",
                      entropy=None, entropy_coef: float = 0.0, tis_weight=None) -> dict:
    """Per-token terms of L = -(min(r·A, clip(r)·A) - β·KL) - α_ent·H (all [tokens]); the caller weights,
    sums and divides them per ``token_weights``. ``tis_weight`` (truncated importance sampling,
    min(π_old/π_rollout, C)) multiplies the surrogate when the rollout engine's log-probs differ."""
    surrogate, clipped = clipped_objective(logp, old_logp, adv, clip_eps)
    if tis_weight is not None:
        surrogate = surrogate * tis_weight
    kl = kl_estimate(logp, ref_logp, kl_kind) if ref_logp is not None else torch.zeros_like(logp)
    loss = -(surrogate - kl_coef * kl)
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy
    return {"loss": loss, "kl": kl.detach(), "clipped": clipped,
            "entropy": entropy.detach() if entropy is not None else torch.zeros_like(logp)}


def reference_loss(logps, old_logps, ref_logps, advs, kept, *, agg: str, budget: int | None = None,
                   clip_eps: float = 0.2, kl_coef: float = 0.0, kl_kind: str = "k3") -> torch.Tensor:
    """The whole-batch loss in one expression (lists of per-response token tensors, truncated to ``kept``):
    what the distributed micro-batched computation must equal. Used by tests and benchmarks."""
    w, denom = token_weights(kept, agg, budget)
    total = 0.0
    for lp, olp, rlp, a, k, wi in zip(logps, old_logps, ref_logps, advs, kept, w):
        if k:
            t = policy_loss_terms(lp[:k], olp[:k], rlp[:k], torch.full((k,), float(a)), clip_eps=clip_eps,
                                  kl_coef=kl_coef, kl_kind=kl_kind)["loss"]
            total = total + wi * t.sum()
    return total / denom
