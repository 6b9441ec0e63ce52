"""Entropy-based checkpoint selection (Ring-lite): pick the SFT checkpoint whose token entropy on its own
samples lies in a window (default 0.3-0.5), not the one with the best validation score."""
from .entropy import choose, select_checkpoints, token_entropy

__all__ = ["choose", "select_checkpoints", "token_entropy"]
