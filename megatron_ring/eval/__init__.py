"""Evaluation as in the Ring-lite paper: benchmarks with one schema, k samples per problem at T=1.0 / top-p 0.95
against any OpenAI-compatible endpoint, avg@k and unbiased pass@k, graded with the RL rewards, the paper's Table 1."""
from .metrics import pass_at_k, summarize
from .runner import EvalConfig, run

__all__ = ["EvalConfig", "pass_at_k", "run", "summarize"]
