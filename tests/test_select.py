"""Entropy-based checkpoint selection: the paper's rule on hand-made entries."""
from megatron_ring.select import choose

E = [{"checkpoint": "e1", "iteration": 1, "entropy": 0.49, "accuracy": 0.60},
     {"checkpoint": "e5", "iteration": 5, "entropy": 0.35, "accuracy": 0.66},
     {"checkpoint": "e9", "iteration": 9, "entropy": 0.27, "accuracy": 0.70}]  # the paper's three epochs


def test_pick_is_inside_the_window_not_the_best_score():
    pick, why = choose(E, (0.3, 0.5))
    assert pick["checkpoint"] == "e5" and "best validation accuracy among 2" in why  # e9 scores best but is outside


def test_without_accuracy_the_highest_entropy_inside_wins():
    pick, _ = choose([dict(e, accuracy=None) for e in E], (0.3, 0.5))
    assert pick["checkpoint"] == "e1"


def test_nothing_inside_selects_nothing_and_says_why():
    pick, why = choose(E, (0.55, 0.9))
    assert pick is None and "nearest is e1" in why
