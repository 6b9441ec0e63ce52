"""Rule-based rewards of the Ring-lite RL stages: Math-Verify for math and science, a sandbox that runs
code against its test cases (1 only if all pass), and a worker pool that scores rollouts."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reward:
    value: float
    reason: str


from .pool import RewardPool, reward_job, score  # noqa: E402

__all__ = ["Reward", "RewardPool", "reward_job", "score"]
