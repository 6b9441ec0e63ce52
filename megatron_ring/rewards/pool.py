"""Scoring rollouts in a pool of worker processes (spawned: they never share the trainer's threads or
its process group). A job is {domain, response, answer | test_cases | prefix+check+entry_point, truncated}
(domain: math, science, code, code_check — HumanEval —, choice — GPQA); a worker failure is a
reward 0 with the reason, never an exception in the trainer."""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

from . import Reward
from .sandbox import Sandbox, SandboxLimits

_SANDBOX: Sandbox | None = None


def _init(limits: dict, allow_unsafe: bool) -> None:
    global _SANDBOX
    _SANDBOX = Sandbox(SandboxLimits(**limits), allow_unsafe=allow_unsafe)


def reward_job(row: dict, response: str, truncated: bool) -> dict:
    """The scoring job of one response to a prompt row (id, prompt, domain, answer | test_cases)."""
    return {"domain": row["domain"], "response": response, "answer": row.get("answer"),
            "test_cases": row.get("test_cases"), "truncated": truncated}


def score(job: dict, sandbox: Sandbox | None = None) -> Reward:
    from .code import code_reward, function_reward
    from .verify_math import choice_reward, math_reward

    domain, truncated = job.get("domain"), bool(job.get("truncated"))
    try:
        if domain in ("math", "science"):
            return math_reward(job["response"], job["answer"], truncated)
        if domain == "code":
            return code_reward(job["response"], job.get("test_cases") or [], sandbox or _SANDBOX, truncated)
        if domain == "code_check":
            return function_reward(job["response"], job["prefix"], job["check"], job["entry_point"],
                                   sandbox or _SANDBOX, truncated, reference=job.get("answer"))
        if domain == "choice":
            return choice_reward(job["response"], job["answer"], truncated)
        return Reward(0.0, f"no_reward_for_domain:{domain}")
    except Exception as e:  # a grader bug must not take the trainer down
        return Reward(0.0, f"grader_error:{type(e).__name__}: {e}"[:200])


def cpu_workers() -> int:
    """One grading worker per CPU this process may use (each sandbox is held to one CPU by its cgroup)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class RewardPool:
    def __init__(self, workers: int = 2, limits: SandboxLimits | None = None, allow_unsafe: bool = False):
        """``workers`` 0: one per CPU (``cpu_workers``)."""
        limits = limits or SandboxLimits()
        Sandbox(limits, allow_unsafe=allow_unsafe)  # refuse here, before any rollout, if isolation is missing
        self.ex = ProcessPoolExecutor(workers or cpu_workers(), mp_context=mp.get_context("spawn"), initializer=_init,
                                      initargs=(asdict(limits), allow_unsafe))

    def map(self, jobs: list[dict]) -> list[Reward]:
        futs = [self.ex.submit(score, j) for j in jobs]
        out = []
        for f in futs:
            try:
                out.append(f.result())
            except Exception as e:  # a worker died (e.g. killed): score 0, keep going
                out.append(Reward(0.0, f"worker_error:{type(e).__name__}"))
        return out

    def close(self) -> None:
        self.ex.shutdown(cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
