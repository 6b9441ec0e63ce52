"""The megatron side of the C3PO step: micro-batched and distributed (TP vocab-parallel, EP x DP) loss
equal to the whole-batch reference formula with π_old ≠ π_θ (ratios away from 1, some clipped), and its gradient
norm equal to autograd of that formula on the HF model; entropy equal to the full-logits entropy; weight sync exact."""
import json

import pytest

from .conftest import cli, torchrun


@pytest.fixture(scope="module")
def ref_ckpt(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    cli("init", "--recipe", "tiny", "--out", d / "hf", "--seed", "9")
    cli("convert", "hf-to-mcore", "--hf", d / "hf", "--out", d / "mcore")
    return d / "mcore"


@pytest.mark.parametrize("nproc,args", [(1, ["--agg", "c3po"]), (1, ["--agg", "seq-mean-token-mean"]),
                                        (2, ["--tp", "2"]), (2, ["--ep", "2"])],
                         ids=["c3po", "grpo", "tp2", "ep2_dp2"])
def test_distributed_loss_equals_reference(tiny, ref_ckpt, tmp_path, nproc, args):
    out = tmp_path / "r.json"
    torchrun("case_rl_loss.py", nproc, "--ckpt", tiny["mcore"], "--ref", ref_ckpt, "--hf", tiny["export"], "--out", out, *args)
    r = json.loads(out.read_text())
    assert r["microbatches"] >= 2
    assert r["pg_loss"] == pytest.approx(r["reference"], abs=1e-5, rel=1e-5), r
    assert r["entropy"] == pytest.approx(r["entropy_full_logits"], rel=1e-5), r
    assert r["kl"] > 1e-3 and r["grad_norm"] > 0  # a real reference policy, a real gradient
    assert 0.05 < r["clipfrac"] < 0.95, r  # the ratio moved: some tokens clip, some do not
    # the gradient itself (through the ratio, the clip, the KL): megatron == HF autograd of the reference loss
    assert r["grad_norm"] == pytest.approx(r["grad_norm_reference"], rel=1e-5), r
    assert r["sync_ok"] is True
