"""C3PO / GRPO algorithm pieces against hand computations."""
import math
import random

import pytest
import torch

from megatron_ring.rl.c3po import (budget_select, clipped_objective, group_advantages, kl_estimate,
                                   reference_loss, token_weights)


def test_budget_select_meets_the_budget_exactly_in_prompt_order():
    lengths = [5, 3, 7, 2, 6, 4]  # prompt 0: 5,3 | prompt 1: 7,2 | prompt 2: 6,4 (flattened in that order)
    assert budget_select(lengths, 12) == [5, 3, 4, 0, 0, 0]  # the crossing response keeps a 4-token prefix
    assert sum(budget_select(lengths, 12)) == 12
    assert budget_select(lengths, 8) == [5, 3, 0, 0, 0, 0]  # crossing exactly at a boundary: no empty prefix
    assert budget_select(lengths, 100) == lengths  # fewer tokens than Φ: all kept
    assert budget_select(lengths, 0) == [0] * 6
    rng = random.Random(0)
    for _ in range(200):
        ls = [rng.randint(1, 50) for _ in range(rng.randint(1, 30))]
        phi = rng.randint(1, 600)
        kept = budget_select(ls, phi)
        assert sum(kept) == min(phi, sum(ls))
        cut = next((i for i, (k, n) in enumerate(zip(kept, ls)) if k < n), len(ls))
        assert kept[:cut] == ls[:cut] and all(k == 0 for k in kept[cut + 1:])  # a prefix, then nothing


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r)
    s = math.sqrt(1 / 3)  # std (unbiased) of [1,0,0,1] = sqrt(4*0.25/3)
    assert a[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rel=1e-5)
    assert a[1].tolist() == [0.0] * 4  # no signal in a solved group
    assert a[2].tolist() == pytest.approx([-0.5, -0.5, -0.5, 1.5], rel=1e-5)  # mean .25, std .5


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_estimate(lp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    x = torch.tensor([-0.5, 1.0])  # log(ref/π)
    assert kl_estimate(lp, ref, "k3").tolist() == pytest.approx((x.exp() - x - 1).tolist())
    # both unbiased for KL(π||ref) on samples from π; k3 is never negative and has lower variance
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    true = float((p * (p / q).log()).sum())
    s = torch.multinomial(p, 200_000, replacement=True, generator=g)
    k1, k3 = kl_estimate(p.log()[s], q.log()[s], "k1"), kl_estimate(p.log()[s], q.log()[s], "k3")
    assert float(k1.mean()) == pytest.approx(true, abs=5e-3) and float(k3.mean()) == pytest.approx(true, abs=5e-3)
    assert float(k3.min()) >= 0 and float(k3.var()) < float(k1.var())
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(lp, ref, "k2")


def test_clipped_objective_by_hand():
    logp, old = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7])), torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    obj, clipped = clipped_objective(logp, old, adv, 0.2)
    # r=1.5,A=+1 -> min(1.5, 1.2)=1.2 (clipped); r=.5,A=+1 -> .5; r=1.1,A=-1 -> -1.1; r=.7,A=-1 -> min(-.7,-.8)=-.8
    assert obj.tolist() == pytest.approx([1.2, 0.5, -1.1, -0.8], rel=1e-6)
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_clipped_objective_gradient_by_hand():
    """d/dlogp min(r·A, clip(r)·A) = r·A where the unclipped term is taken, 0 where the clip binds (r = e^(logp-old)):
    the policy gradient flows through the ratio only inside the trust region."""
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    obj, _ = clipped_objective(logp, torch.zeros(4), adv, 0.2)
    obj.sum().backward()
    assert logp.grad.tolist() == pytest.approx([0.0, 0.5, -1.1, 0.0], rel=1e-6, abs=1e-7)


def test_c3po_loss_by_hand():
    """Two responses, Φ = 3: response 0 keeps both tokens, response 1 keeps its first token only.
    loss = -(1/Φ)·Σ_kept(min(r·A, clip(r)·A) - β·KL_k1)."""
    lp = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -0.7, -0.9])]
    old = [torch.tensor([-1.1, -2.0]), torch.tensor([-0.5, -0.2, -0.9])]
    ref = [torch.tensor([-1.0, -1.5]), torch.tensor([-1.0, -0.7, -0.9])]
    adv, beta = [2.0, -1.0], 0.1
    kept = budget_select([2, 3], 3)
    assert kept == [2, 1]
    r00, r01, r10 = math.exp(0.1), 1.0, 1.0
    s00 = min(r00 * 2, min(max(r00, 0.8), 1.2) * 2)
    terms = [s00 - beta * (-1.0 - -1.0), r01 * 2 - beta * (-2.0 - -1.5), r10 * -1 - beta * (-0.5 - -1.0)]
    want = -sum(terms) / 3
    got = reference_loss(lp, old, ref, adv, kept, agg="c3po", budget=3, clip_eps=0.2, kl_coef=beta, kl_kind="k1")
    assert float(got) == pytest.approx(want, rel=1e-6)
    # GRPO's per-response token mean over the same kept tokens
    grpo = reference_loss(lp, old, ref, adv, kept, agg="seq-mean-token-mean", clip_eps=0.2, kl_coef=beta, kl_kind="k1")
    assert float(grpo) == pytest.approx(-((terms[0] + terms[1]) / 2 + terms[2] / 1) / 2, rel=1e-6)


def test_one_over_phi_makes_the_gradient_scale_independent_of_the_sample_count():
    """Per-token gradients g_t i.i.d.: ||Σ w_t g_t / D|| ≈ sqrt(Σ w_t²)/D. With C3PO (kept = Φ, w = 1,
    D = Φ) that is sqrt(Φ)/Φ whatever was generated; the token mean over everything generated shrinks as
    more responses are sampled, and GRPO's 1/|y| weights move it with the lengths."""
    rng = random.Random(1)
    phi, scale = 4000, {}
    for agg in ("c3po", "token-mean", "seq-mean-token-mean"):
        vals = []
        for n in (64, 128, 256):
            lengths = [rng.randint(20, 200) for _ in range(n)]
            kept = budget_select(lengths, phi) if agg == "c3po" else lengths
            w, d = token_weights(kept, agg, phi)
            vals.append(math.sqrt(sum(wi * wi * k for wi, k in zip(w, kept))) / d)
        scale[agg] = vals
    assert max(scale["c3po"]) == pytest.approx(min(scale["c3po"]), rel=1e-12) == 1 / math.sqrt(phi)
    for agg in ("token-mean", "seq-mean-token-mean"):
        assert max(scale[agg]) / min(scale[agg]) > 1.5, scale[agg]


def test_token_weights_refuse_bad_settings():
    with pytest.raises(ValueError, match="budget"):
        token_weights([1, 2], "c3po", None)
    with pytest.raises(ValueError, match="expected one of"):
        token_weights([1, 2], "sum", 3)
