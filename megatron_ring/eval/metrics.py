"""avg@k (the paper's "AIME@32": the mean over problems of the fraction of k samples that are correct) and the
unbiased pass@k estimator of Chen et al. 2021: 1 - C(n-c, k) / C(n, k) per problem, averaged."""
from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (have {n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(correct: dict[str, list[float]]) -> dict:
    """Per-benchmark figures from {problem id: [reward per sample]} (every problem with the same n)."""
    ns = {len(v) for v in correct.values()}
    if len(ns) != 1:
        raise ValueError(f"problems have different sample counts {sorted(ns)}: finish the run first")
    n = ns.pop()
    cs = [sum(1 for x in v if x >= 1.0) for v in correct.values()]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n] + ([n] if n not in (1, 2, 4, 8, 16, 32, 64, 128) else [])
    return {"problems": len(cs), "samples_per_problem": n, f"avg@{n}": float(np.mean([c / n for c in cs])),
            "pass@k": {str(k): float(np.mean([pass_at_k(n, c, k) for c in cs])) for k in ks},
            "solved_any": sum(c > 0 for c in cs)}
