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


def test_sampled_entropies_equal_a_full_forward_over_the_samples(tiny):
    """The entropies `select` averages come from generate()'s cached decoding; a full forward (no cache) over the
    same prompt + samples must give the same distribution at every counted position (a broken KV cache, or a
    position shifted by one, shows here)."""
    import torch

    from megatron_ring.select.entropy import sample_entropies
    from megatron_ring.sft.heldout import load_chat_model

    tok, model = load_chat_model(tiny["export"])
    torch.manual_seed(0)
    prompts = ["What is 2 + 3?", "Name a prime number larger than ten, please.", "hi"]  # unequal: left padding
    enc, gen, ent, valid = sample_entropies(model, tok, prompts, max_new_tokens=12)
    assert valid.sum() >= 12 and enc["attention_mask"].min() == 0
    ids = torch.cat([enc["input_ids"], gen], 1)
    mask = torch.cat([enc["attention_mask"], valid.long()], 1)
    logp = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().log_softmax(-1)
    P = enc["input_ids"].shape[1]
    full = -(logp.exp() * logp).sum(-1)[:, P - 1:-1]  # the distribution each generated token was drawn from
    assert full.shape == ent.shape
    diff = (full - ent)[valid].abs().max()
    assert diff <= 1e-4, diff
    assert float(ent[valid].std()) > 1e-3  # entropies vary with context: the comparison means something
