"""``megatron-ring plan``: per-rank memory before anything is allocated. Its terms are checked against what
megatron-core really allocates on the CPU for a Ling-shaped model (64 experts top-6, 2 shared, GQA, NormHead; narrow
hidden and vocab), at one rank and at EP2 with the distributed optimizer and full recompute; the shipped ling_lite
recipes fit 16 x 80 GB; a layout that cannot fit is refused naming its largest term."""
import json
from pathlib import Path

import pytest

from .conftest import cli, read_json, torchrun

MID = Path(__file__).parent / "data" / "ling_shaped_mid.json"


@pytest.mark.parametrize("nproc,args", [(1, []), (2, ["--ep", "2", "--dist-opt", "--recompute", "full"])],
                         ids=["1rank", "ep2_distopt_recompute"])
def test_plan_matches_what_megatron_allocates(tmp_path, nproc, args):
    out = tmp_path / "m.json"
    torchrun("case_memory.py", nproc, "--hf-config", MID, "--out", out, "--tokens", "512", *args)
    r = read_json(out)
    m, p = r["measured"], r["plan"]
    for k in ("weights", "gradients", "optimizer"):  # parameter, fp32 grad-buffer and Adam/master bytes
        assert abs(m[k] - p[k]) <= 0.01 * m[k], (k, m[k], p[k])
    assert abs(m["saved for backward"] - r["plan saved for backward"]) <= 0.05 * m["saved for backward"], r
    if args:  # the distributed optimizer's shard and the recompute really shrink memory
        assert m["optimizer"] < 0.6 * 716197888 and m["saved for backward"] < 0.5 * 181834248, m


@pytest.mark.parametrize("recipe", ["sft_distill_ling_lite", "rl_stage1_ling_lite", "rl_stage2_ling_lite"])
def test_shipped_ling_lite_recipes_fit_16_gpus_of_80_gb(recipe):
    r = cli("plan", "--recipe", recipe, "--gpus", "16", "--gpu-mem", "80")
    total = [line for line in r.stdout.splitlines() if line.strip().startswith("total")][0]
    assert "fits" in total and "DOES NOT" not in total, r.stdout
    gib = float(total.split()[1])
    assert 20 < gib < 80, r.stdout  # a Ling-lite replica's states alone are ~24 GiB per rank at EP8, TP4


def test_a_layout_that_cannot_fit_is_refused_naming_the_largest_term(tmp_path):
    p = tmp_path / "old.yaml"  # the layout shipped before the plan existed: TP1, PP2, no recompute
    p.write_text("base: sft_distill_ling_lite\nname: old\nparallel:\n  tensor_model_parallel_size: 1\n"
                 "  sequence_parallel: false\n  pipeline_model_parallel_size: 2\nmemory:\n  recompute_granularity: null\n"
                 "  recompute_method: null\n  recompute_num_layers: null\n  use_distributed_optimizer: false\n")
    r = cli("plan", "--recipe", p, "--gpus", "16", "--gpu-mem", "80", check=False)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout
    assert "largest term is activations" in r.stderr, r.stderr


def test_check_fits_refuses_before_allocation():
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.model.memory import GiB, check_fits

    recipe = load_recipe("rl_stage2_ling_lite")
    hf = load_recipe("ling_lite").hf_config
    assert check_fits(recipe, hf, 16, 80 * GiB, flash=True).fits
    with pytest.raises(MemoryError, match="largest term is optimizer"):
        check_fits(recipe, hf, 16, 40 * GiB, flash=True)


def test_the_rl_logits_term_is_what_autograd_keeps():
    """The RL loss's log-probs and entropy (rl/logprob.py) keep the logits and three numbers per token for the
    backward: the plan's logits/loss term for RL is the logits twice (their gradient comes back in the same dtype) plus
    one chunk of fp32 temporaries. (The composition it replaced, a float copy, megatron's CE on another copy, exp and
    e*z for the entropy, kept about six fp32 copies: 25 GiB per rank of Ling-lite's plan at TP4.)"""
    import torch

    from megatron_ring.rl.logprob import logprob_and_entropy

    tokens, vocab = 2048, 3000
    logits = torch.randn(1, tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = logprob_and_entropy(logits, labels, 0.8, chunk=256)
        ((logp + 1e-2 * ent) * torch.rand(1, tokens)).sum().backward()
    logit_bytes = tokens * vocab * 2
    assert logit_bytes <= sum(kept) <= logit_bytes + tokens * 32, (sum(kept), logit_bytes)
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.shape == logits.shape
