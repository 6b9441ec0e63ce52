"""The C3PO objective checked term by term against a reference written from the paper (Ring-lite §3, C3PO; GRPO's
clipped surrogate, Schulman's k1/k3 KL, the entropy bonus), in plain torch over explicit per-token tensors. Nothing
here imports ``megatron_ring.rl``: a wrong sign or scale inside a project function cannot pass on both sides.

Then direction tests on a tiny policy (one optimiser step with one term on moves the policy the way the term says),
and decontamination at its n-gram boundary."""
import json

import pytest
import torch

EPS, BETA, ALPHA = 0.2, 0.05, 0.01


# --- the reference: the paper's formulas, token by token -----------------------------------------------------------
def paper_kept(lengths: list[int], phi: int) -> list[int]:
    """C3PO: responses flattened prompt by prompt, tokens taken in order until Φ are used; the response that crosses
    Φ contributes its first tokens only, the ones after it nothing."""
    out, used = [], 0
    for n in lengths:
        take = max(0, min(n, phi - used))
        out.append(take)
        used += take
    return out


def paper_token_term(lp, old, ref, a, h, kl_kind):
    """ -[min(r·A, clip(r, 1-ε, 1+ε)·A) - β·KL] - α·H  for one token (floats or 0-d tensors)."""
    r = torch.exp(lp - old)
    surrogate = torch.min(r * a, torch.clamp(r, 1 - EPS, 1 + EPS) * a)
    if kl_kind == "k1":
        kl = lp - ref  # log π/π_ref
    else:  # k3 = π_ref/π - log(π_ref/π) - 1 >= 0
        kl = torch.exp(ref - lp) - (ref - lp) - 1
    return -(surrogate - BETA * kl) - ALPHA * h, surrogate, kl


def paper_loss(batch: list[dict], agg: str, phi: int | None, kl_kind: str = "k3"):
    """The whole loss, aggregated as the paper (C3PO: 1/Φ over the kept tokens, Φ even when fewer were generated)
    or GRPO's forms (token mean over the kept tokens; the mean over responses of each response's token mean)."""
    kept = paper_kept([len(b["lp"]) for b in batch], phi) if phi else [len(b["lp"]) for b in batch]
    per_resp = []
    for b, k in zip(batch, kept):
        terms = [paper_token_term(b["lp"][t], b["old"][t], b["ref"][t], b["adv"], b["h"][t], kl_kind)[0]
                 for t in range(k)]
        per_resp.append((sum(terms) if terms else torch.zeros(()), k))
    if agg == "c3po":
        return sum(s for s, _ in per_resp) / phi, kept
    if agg == "token-mean":
        return sum(s for s, _ in per_resp) / sum(kept), kept
    return sum(s / k for s, k in per_resp if k) / sum(1 for _, k in per_resp if k), kept


# --- the project's computation, as the trainer composes it ---------------------------------------------------------
def project_loss(batch: list[dict], agg: str, phi: int | None, kl_kind: str = "k3"):
    from megatron_ring.rl.c3po import budget_select, policy_loss_terms, token_weights

    lengths = [len(b["lp"]) for b in batch]
    kept = budget_select(lengths, phi) if phi and agg == "c3po" else lengths
    w, denom = token_weights(kept, agg, phi)
    total = torch.zeros(())
    for b, k, wi in zip(batch, kept, w):
        if k:
            t = policy_loss_terms(b["lp"][:k], b["old"][:k], b["ref"][:k], torch.full((k,), float(b["adv"])),
                                  clip_eps=EPS, kl_coef=BETA, kl_kind=kl_kind, entropy=b["h"][:k],
                                  entropy_coef=ALPHA)
            total = total + wi * t["loss"].sum()
    return total / denom, kept


def batch(seed: int = 0) -> list[dict]:
    """3 prompts x 2 responses, every term non-zero: ratios beyond the clip on both sides for both signs of the
    advantage, π ≠ π_ref, entropy > 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n, a) in enumerate([(5, 1.3), (4, -0.7), (6, 0.9), (3, -1.1), (7, 0.4), (2, -0.2)]):
        old = -torch.rand(n, generator=g) * 3 - 0.1
        shift = (torch.rand(n, generator=g) - 0.5) * 1.2  # ratios e^±0.6: inside and outside [0.8, 1.2]
        lp = (old + shift).clone().requires_grad_(True)
        ref = old + (torch.rand(n, generator=g) - 0.5)
        h = torch.rand(n, generator=g) * 2 + 0.1
        out.append({"lp": lp, "old": old, "ref": ref, "adv": a, "h": h.requires_grad_(True)})
    return out


@pytest.mark.parametrize("agg,phi", [("c3po", 17), ("c3po", 27), ("c3po", 200), ("token-mean", None),
                                     ("seq-mean-token-mean", None)],
                         ids=["c3po-budget-mid-response", "c3po-budget-at-a-boundary", "c3po-fewer-than-budget",
                              "token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("kl_kind", ["k3", "k1"])
def test_the_loss_and_its_gradient_equal_the_papers(agg, phi, kl_kind):
    """Total and gradient (w.r.t. every token's log-prob and entropy) equal the reference; C3PO with a budget that
    cuts a response, one that ends at a response boundary, and one larger than all tokens (1/Φ still)."""
    ours, theirs = batch(), batch()
    want, kept_want = paper_loss(theirs, agg, phi, kl_kind)
    got, kept_got = project_loss(ours, agg, phi, kl_kind)
    assert kept_got == kept_want
    if phi == 200:
        assert sum(kept_got) == 27 < phi  # fewer tokens than Φ: the denominator stays Φ
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    want.backward()
    got.backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a["lp"].grad, b["lp"].grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(a["h"].grad, b["h"].grad, rtol=1e-5, atol=1e-8)


def test_each_term_equals_the_papers():
    """Surrogate (both advantage signs, clipped and not), k1 and k3 separately, and the clip indicator."""
    from megatron_ring.rl.c3po import clipped_objective, kl_estimate

    lp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -2.0, -0.5])
    old = torch.tensor([-1.5, -0.5, -1.5, -0.5, -2.0, -0.6])  # r = e^.5, e^-.5, e^.5, e^-.5, 1, e^.1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0, -3.0])
    ref = torch.tensor([-0.3, -1.7, -1.0, -2.5, -2.1, -0.2])
    sur, clipped = clipped_objective(lp, old, adv, EPS)
    for t in range(6):
        _, s, k3 = paper_token_term(lp[t], old[t], ref[t], adv[t], 0.0, "k3")
        _, _, k1 = paper_token_term(lp[t], old[t], ref[t], adv[t], 0.0, "k1")
        assert float(sur[t]) == pytest.approx(float(s), rel=1e-6)
        assert float(kl_estimate(lp[t:t + 1], ref[t:t + 1], "k3")) == pytest.approx(float(k3), rel=1e-6)
        assert float(kl_estimate(lp[t:t + 1], ref[t:t + 1], "k1")) == pytest.approx(float(k1), rel=1e-6)
    # the clip binds where it lowers the objective: A>0 with r>1+ε, A<0 with r<1-ε; not otherwise
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


# --- direction tests: one step of a tiny policy with one term on ---------------------------------------------------
def _policy_step(kind: str):
    """A tiny policy (position-wise logits over 6 tokens, 4 positions), one SGD step on the project's loss with only
    ``kind`` on; returns (before, after) of what that term should move."""
    from megatron_ring.rl.c3po import policy_loss_terms, token_weights

    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(4, 6))
    ref_logits = torch.randn(4, 6)
    tokens = torch.tensor([1, 4, 2, 0])

    def measures():
        logp_all = torch.log_softmax(logits, -1)
        lp = logp_all.gather(-1, tokens[:, None])[:, 0]
        ent = -(logp_all.exp() * logp_all).sum(-1)
        kl = (logp_all.exp() * (logp_all - torch.log_softmax(ref_logits, -1))).sum(-1)  # exact KL(π||π_ref)
        return lp, ent, kl

    lp, ent, _ = measures()
    ref_lp = torch.log_softmax(ref_logits, -1).gather(-1, tokens[:, None])[:, 0]
    adv = torch.full((4,), 1.0 if kind == "advantage" else 0.0)
    terms = policy_loss_terms(lp, lp.detach(), ref_lp if kind == "kl" else None, adv, clip_eps=EPS,
                              kl_coef=1.0 if kind == "kl" else 0.0, entropy=ent if kind == "entropy" else None,
                              entropy_coef=1.0 if kind == "entropy" else 0.0)
    w, denom = token_weights([4], "c3po", 8)
    loss = (w[0] * terms["loss"]).sum() / denom
    before = [x.detach().clone() for x in measures()]
    torch.optim.SGD([logits], lr=0.5).zero_grad()
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    return before, [x.detach() for x in measures()]


def test_the_entropy_bonus_raises_the_policys_entropy():
    (_, ent0, _), (_, ent1, _) = _policy_step("entropy")
    assert float(ent1.sum()) > float(ent0.sum()) + 1e-3, (ent0, ent1)


def test_the_kl_term_lowers_the_kl_to_the_reference():
    (_, _, kl0), (_, _, kl1) = _policy_step("kl")
    assert float(kl1.sum()) < float(kl0.sum()) - 1e-4, (kl0, kl1)


def test_a_positive_advantage_raises_the_responses_log_prob():
    (lp0, _, _), (lp1, _, _) = _policy_step("advantage")
    assert float(lp1.sum()) > float(lp0.sum()) + 1e-3, (lp0, lp1)


# --- decontamination at its boundary --------------------------------------------------------------------------------
BENCH = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa quebec "
         "romeo sierra tango").split()


@pytest.mark.parametrize("n", [13, 8])
def test_decontamination_removes_n_shared_words_and_keeps_n_minus_1(tmp_path, n):
    """A training row sharing exactly n-1 consecutive words with a benchmark item is kept; one sharing n is removed
    and names the item (the default n = 13, and 8)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.decontam import decontaminate
    from data_tools.schema import RL_SCHEMA

    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "q7", "problem": " ".join(BENCH)}) + "\n")
    filler = lambda k: [f"w{k}x{i}" for i in range(20)]  # noqa: E731 (words no benchmark has)
    rows = {"shares-n-minus-1": filler(1) + BENCH[3:3 + n - 1] + filler(2),
            "shares-n": filler(3) + BENCH[3:3 + n] + filler(4)}
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": k, "prompt": " ".join(v), "domain": "math", "answer": "1",
                                          "test_cases": None, "difficulty": None, "source": "t"}
                                         for k, v in rows.items()], schema=RL_SCHEMA), src)
    r = decontaminate(src, tmp_path / "clean.parquet", [bench], n=n, progress=False)
    assert [x["id"] for x in pq.read_table(tmp_path / "clean.parquet").to_pylist()] == ["shares-n-minus-1"]
    assert {x["id"]: x["reason"] for x in pq.read_table(tmp_path / "clean.removed.parquet").to_pylist()} == \
        {"shares-n": "contaminated:bench.jsonl#q7"}
    assert r["rows_kept"] == 1 and r["removed_by_reason"] == {"contaminated": 1}


# --- the MoE balance and z losses (Ring-lite: α_bal 1e-5, α_z 1e-7, added to the C3PO loss) ------------------------
@pytest.mark.parametrize("recipe", ["rl_stage1_ling_lite", "rl_stage2_ling_lite"])
def test_the_moe_balance_and_z_losses_of_the_rl_recipes_equal_the_papers(recipe):
    """The RL recipes' model (with a published Ring-lite config) carries α_bal = 1e-5 and α_z = 1e-7 into megatron's
    router, whose losses on hand-built router logits equal the formulas: balance α·E·Σ_i f_i·P_i (f_i: the share of
    the T·k routed slots going to expert i, P_i: its mean probability; Switch Transformer), z α_z·mean(logsumexp²)
    (ST-MoE)."""
    import dataclasses
    from pathlib import Path

    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func, z_loss_func

    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.model.build import transformer_config

    hf = json.loads((Path(__file__).parent / "data" / "published_configs" / "ring-lite.chat.config.json").read_text())
    cfg = transformer_config(dataclasses.replace(load_recipe(recipe), hf_config=hf))
    assert (cfg.moe_aux_loss_coeff, cfg.moe_z_loss_coeff, cfg.moe_router_load_balancing_type) == (1e-5, 1e-7, "aux_loss")
    E, k, T = cfg.num_moe_experts, cfg.moe_router_topk, 37
    assert (E, k) == (hf["num_experts"], hf["num_experts_per_tok"])
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.softmax(logits, -1)
    routed = torch.zeros(T, E).scatter_(1, probs.topk(k, -1).indices, 1.0)
    f, P = routed.sum(0) / (T * k), probs.mean(0)
    want_bal = cfg.moe_aux_loss_coeff * E * (f * P).sum()
    got_bal = switch_load_balancing_loss_func(probs, routed.sum(0), T, k, E, cfg.moe_aux_loss_coeff)
    torch.testing.assert_close(got_bal, want_bal, rtol=1e-6, atol=0)
    want_z = cfg.moe_z_loss_coeff * (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(z_loss_func(logits, cfg.moe_z_loss_coeff), want_z, rtol=1e-6, atol=0)
