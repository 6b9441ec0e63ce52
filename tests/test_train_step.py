"""One megatron-core training step (DDP + megatron optimizer, MoE aux/z losses on) equals an independent
reference (the HF model, autograd, torch AdamW: tests/hf_reference.py) at TP1, and gives the same losses at
every other layout; a checkpoint saved after training at one layout continues at another."""
import json

import pytest

from .conftest import read_json, torchrun
from .hf_reference import hf_adamw_steps
from .mp.case_train_step import global_batch

TOL = 1e-6


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "tp1.json"
    torchrun("case_train_step.py", 1, "--ckpt", tiny["mcore"], "--out", out, "--steps", "4")
    return read_json(out)["steps"]


def test_tp1_equals_hf_autograd_and_adamw(tiny, reference):
    """The anchor of every layout test below: a bug common to all layouts (loss scaling, the MoE aux/z
    loss weights, weight decay on norms, Adam's settings) shows here as a difference from plain PyTorch."""
    vocab = json.loads((tiny["hf"] / "config.json").read_text())["vocab_size"]
    tokens, mask = global_batch(vocab, 4, 32)
    ref = hf_adamw_steps(tiny["hf"], tokens, mask, steps=3, micro_batch=2, lr=1e-3, aux_coeff=1e-2, z_coeff=1e-3)
    for step, (hf, mc) in enumerate(zip(ref, reference)):
        assert abs(hf["loss"] - mc["loss"]) <= 1e-5, (step, hf, mc)
        assert abs(hf["grad_norm"] - mc["grad_norm"]) <= 1e-5 * hf["grad_norm"], (step, hf, mc)
    assert ref[2]["loss"] < ref[0]["loss"] - 0.5


@pytest.mark.parametrize("name,args", [
    ("tp2_sp", ["--tp", "2"]), ("ep2_dp2", ["--ep", "2"]), ("pp2", ["--pp", "2"]),
    # the memory settings the ling_lite recipes use: same numbers, less memory
    ("ep2_dp2_distopt_full_recompute", ["--ep", "2", "--dist-opt", "--recompute", "full"]),
    ("tp2_selective_recompute", ["--tp", "2", "--recompute", "selective"])])
def test_losses_equal_tp1(tiny, tmp_path, reference, name, args):
    out = tmp_path / "r.json"
    torchrun("case_train_step.py", 2, "--ckpt", tiny["mcore"], "--out", out, "--steps", "3", *args)
    run = read_json(out)
    steps = run["steps"]
    if "--dist-opt" in args:  # the setting took effect (not silently the plain optimizer)
        assert run["optimizers"] == ["DistributedOptimizer"], run["optimizers"]
    assert run["recompute"] == (args[args.index("--recompute") + 1] if "--recompute" in args else None)
    assert reference[2]["loss"] < reference[0]["loss"] - 0.5  # it trains
    # DP=2 sums the gradients of the two data halves in another order than one rank does: allow
    # float32 round-off relative to the loss there; TP and PP must match to 1e-6 absolute.
    tol = 1e-6 * reference[0]["loss"] if name.startswith("ep2_dp2") else TOL
    for ref, got in zip(reference, steps):
        assert abs(ref["loss"] - got["loss"]) <= tol, (name, ref, got)
        assert ref["tokens"] == got["tokens"] == 4 * 24
        assert abs(ref["grad_norm"] - got["grad_norm"]) <= 1e-4 * ref["grad_norm"]


@pytest.mark.parametrize("save,load", [
    (["--tp", "2"], ["--pp", "2"]),
    # the ling_lite settings: distributed optimizer; EP2 (a chained dense + expert optimizer) -> TP2 (one)
    (["--ep", "2", "--dist-opt"], ["--tp", "2", "--dist-opt"])], ids=["tp2_to_pp2", "ep2_distopt_to_tp2_distopt"])
def test_training_checkpoint_continues_at_another_layout(tiny, tmp_path, reference, save, load):
    """Model and optimizer state saved after 2 steps at one layout, 2 more steps at another: both equal the
    uninterrupted TP1 run. The 4th loss depends on the 3rd update, i.e. on the restored Adam moments and step."""
    saved = tmp_path / "after2"
    torchrun("case_train_step.py", 2, "--ckpt", tiny["mcore"], "--out", tmp_path / "a.json", "--steps", "2",
             "--save", saved, *save)
    torchrun("case_train_step.py", 2, "--ckpt", tiny["mcore"], "--resume", saved, "--out", tmp_path / "b.json",
             "--steps", "2", *load)
    got = read_json(tmp_path / "b.json")["steps"]
    tol = 1e-6 * reference[0]["loss"]  # DP=2 on one side: float32 round-off of another reduction order
    assert abs(got[0]["loss"] - reference[2]["loss"]) <= tol, (got, reference)
    assert abs(got[1]["loss"] - reference[3]["loss"]) <= tol, (got, reference)
