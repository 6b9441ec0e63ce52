"""The megatron side of the C3PO step: micro-batched and distributed (TP vocab-parallel, EP x DP) loss
equal to the whole-batch reference formula with π_old ≠ π_θ (ratios away from 1, some clipped), and its gradient
norm equal to autograd of that formula on the HF model; entropy equal to the full-logits entropy; weight sync exact.
The cases of one world size share a torchrun launch (conftest.world); each is still its own test."""
import json

import pytest

from .conftest import case_ok, cli, world

CASES = [("c3po", 1, ["--agg", "c3po"]), ("grpo", 1, ["--agg", "seq-mean-token-mean"]),
         ("tp2", 2, ["--tp", "2"]), ("ep2_dp2", 2, ["--ep", "2"])]


@pytest.fixture(scope="module")
def ref_ckpt(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    cli("init", "--recipe", "tiny", "--out", d / "hf", "--seed", "9")
    cli("convert", "hf-to-mcore", "--hf", d / "hf", "--out", d / "mcore")
    return d / "mcore"


@pytest.fixture(scope="module")
def worlds(tiny, ref_ckpt, tmp_path_factory):
    """{world size: (folder, results)}, each world launched when a test first asks for it."""
    done = {}

    def get(nproc):
        if nproc not in done:
            d = tmp_path_factory.mktemp(f"rl_loss_{nproc}")
            cases = [{"id": name, "run": "case_rl_loss.py",
                      "args": ["--ckpt", tiny["mcore"], "--ref", ref_ckpt, "--hf", tiny["export"],
                               "--out", d / f"{name}.json", *args]} for name, n, args in CASES if n == nproc]
            done[nproc] = d, world(nproc, cases, d)
        return done[nproc]
    return get


@pytest.mark.parametrize("name,nproc,args", CASES, ids=[x[0] for x in CASES])
def test_distributed_loss_equals_reference(worlds, name, nproc, args):
    d, results = worlds(nproc)
    case_ok(results, name)
    r = json.loads((d / f"{name}.json").read_text())
    assert r["microbatches"] >= 2
    assert r["pg_loss"] == pytest.approx(r["reference"], abs=1e-5, rel=1e-5), r
    assert r["entropy"] == pytest.approx(r["entropy_full_logits"], rel=1e-5), r
    assert r["kl"] > 1e-3 and r["grad_norm"] > 0  # a real reference policy, a real gradient
    assert 0.05 < r["clipfrac"] < 0.95, r  # the ratio moved: some tokens clip, some do not
    # the gradient itself (through the ratio, the clip, the KL): megatron == HF autograd of the reference loss
    assert r["grad_norm"] == pytest.approx(r["grad_norm_reference"], rel=1e-5), r
    assert r["sync_ok"] is True


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprob_and_entropy_equal_autograd_of_the_softmax_at_a_temperature(dtype):
    """rl/logprob.py's log π(label) and entropy, and their gradients (its own backward, by chunks), equal autograd
    through log_softmax at temperature 0.7, for both outputs weighted at once (the entropy bonus on)."""
    import torch

    from megatron_ring.rl.logprob import logprob_and_entropy

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 37, 53, generator=g) * 3).to(getattr(torch, dtype)).requires_grad_(True)
    labels = torch.randint(0, 53, (3, 37), generator=g)
    w_logp, w_ent = torch.randn(3, 37, generator=g), torch.randn(3, 37, generator=g)
    logp, ent = logprob_and_entropy(x, labels, 0.7, chunk=16)  # (chunks that do not divide the 111 tokens)
    ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
    got = x.grad.float().clone()
    x.grad = None
    ls = torch.log_softmax(x.float() / 0.7, -1)
    ref_logp, ref_ent = ls.gather(-1, labels[..., None]).squeeze(-1), -(ls.exp() * ls).sum(-1)
    ((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum()).backward()
    assert (logp - ref_logp).abs().max() < 1e-5 and (ent - ref_ent).abs().max() < 1e-5
    tol = 1e-5 if dtype == "float32" else 2e-2  # (bf16: the gradient is rounded to the logits' dtype)
    assert (got - x.grad.float()).abs().max() <= tol * x.grad.abs().max(), (got - x.grad.float()).abs().max()
