"""The SFT trainer: a run killed after step k and resumed from ``latest`` gives bit-identical losses
at every later step to an uninterrupted run, on 1 rank and on 2 ranks (EP2 x DP2); checkpoints are
complete directories behind a ``latest`` pointer."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import PY, ROOT, cli, shared


def _sft(nproc, out, packed, init, max_steps, *extra):
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           "-m", "megatron_ring.cli", "sft", "--data", str(packed), "--init", str(init), "--out", str(out),
           "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", str(max_steps), *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-8000:]


def uninterrupted(tmp_path_factory, tiny, packed) -> Path:
    """The uninterrupted 1-rank run every resume test compares with, run once per session (conftest.shared): one
    epoch + 2 steps, so it covers the preemption test's crossing into epoch 2 (a shorter run's history is a prefix
    of it: the schedule depends on the epochs, not on --max-steps)."""
    import pyarrow.parquet as pq

    steps = pq.read_metadata(packed).num_rows // 4 + 2
    return shared(tmp_path_factory, "sft-uninterrupted",
                  lambda d: _sft(1, d / "run", packed, tiny["mcore"], steps)) / "run"


def _scalars(tb_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def _history(out):
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / "megatron_ring.json").read_text())["history"]


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["--ep", "2"])], ids=["1rank", "2ranks_ep2_dp2"])
def test_resume_is_bit_exact(tiny, packed, tmp_path, tmp_path_factory, nproc, extra):
    if nproc == 1:
        a_dir = uninterrupted(tmp_path_factory, tiny, packed)  # (longer than 6 steps: its first 6 are compared)
    else:
        a_dir = tmp_path / "a"
        _sft(nproc, a_dir, packed, tiny["mcore"], 6, *extra)
    _sft(nproc, tmp_path / "b", packed, tiny["mcore"], 3, *extra)  # "killed" after step 3 (checkpoint written)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    _sft(nproc, tmp_path / "b", packed, tiny["mcore"], 6, *extra)  # resumed from latest
    a, b = _history(a_dir)[:6], _history(tmp_path / "b")
    assert [h["step"] for h in b] == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in a] == [h["loss"] for h in b]  # bit-exact on CPU
    assert [h["grad_norm"] for h in a] == [h["grad_norm"] for h in b]
    assert a[-1]["loss"] < a[0]["loss"]
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["iter_0000003", "iter_0000006", "latest"]  # no .tmp left behind
    tb = _scalars(a_dir / "tb")
    assert [v for _, v in tb["sft/loss"]][:6] == pytest.approx([h["loss"] for h in a], rel=1e-6)
    for layer in range(4):  # MoE balance per layer (aux loss / coeff: 1.0 = balanced; 8 experts top-2 -> >= 1)
        bal = [v for s, v in tb[f"moe/load_balancing_loss_layer_{layer}"] if s <= 6]
        assert len(bal) == 6 and all(0.99 < v < 8 for v in bal), bal
    if nproc == 1:  # a training checkpoint (model + optimizer) exports like a converted one
        cli("convert", "mcore-to-hf", "--ckpt", tmp_path / "b" / "checkpoints" / "iter_0000006",
            "--out", tmp_path / "hf", "--tokenizer", tiny["hf"])
        cli("check-hf", tmp_path / "hf")
        # entropy-based selection over the run's checkpoints: entropy falls with training
        r = cli("select", "--run", tmp_path / "b", "--prompts", packed.parents[1] / "rl_stage1" / "4_filtered.parquet",
                "--tokenizer", tiny["hf"], "--limit", "8", "--max-new-tokens", "24", "--window", "0", "100")
        sel = json.loads((tmp_path / "b" / "selection" / "selection.json").read_text())
        ents = [e["entropy"] for e in sel["entries"]]
        assert [e["checkpoint"] for e in sel["entries"]] == ["iter_0000003", "iter_0000006"]
        assert ents[1] < ents[0], ents
        assert (tmp_path / "b" / "selection" / "selection.png").stat().st_size > 5000 and "inside" in r.stdout
        # a window that holds only the earlier (higher-entropy) checkpoint: it is picked, although it is not the
        # last one, and the `selected` pointer RL reads names it
        lo = (ents[0] + ents[1]) / 2
        r = cli("select", "--run", tmp_path / "b", "--prompts", packed.parents[1] / "rl_stage1" / "4_filtered.parquet",
                "--tokenizer", tiny["hf"], "--limit", "8", "--max-new-tokens", "24", "--window", lo, 100)
        assert (tmp_path / "b" / "checkpoints" / "selected").read_text().strip() == "iter_0000003", r.stdout


def test_preemption_signal_checkpoints_and_resumes_across_an_epoch(tiny, packed, tmp_path, tmp_path_factory):
    """slurm/sft_distill.sh without Slurm: USR1 to the batch shell (what `--signal=B:USR1@N` sends) makes the
    ranks checkpoint at the next step boundary; running the script again resumes, crosses the epoch boundary
    (a new data order) and ends where an uninterrupted run ends, with the same per-step losses.
    No timing slack: the preempted run is given the whole schedule (2 epochs), so it can only end by the signal."""
    import signal
    import time

    import pyarrow.parquet as pq

    per_epoch = pq.read_metadata(packed).num_rows // 4
    assert per_epoch >= 8
    common = f"--data {packed} --init {tiny['mcore']} --out {tmp_path / 'run'} --global-batch-size 4 --micro-batch-size 2"
    env = dict(os.environ, RECIPE="sft_distill_tiny", NPROC="1", SFT_ARGS=common, PY=PY)
    log = open(tmp_path / "log.txt", "w")
    p = subprocess.Popen(["bash", str(ROOT / "slurm" / "sft_distill.sh")], cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT)
    while '"step": 2,' not in (tmp_path / "log.txt").read_text() and p.poll() is None:
        time.sleep(0.2)  # waits for an event in the log (no deadline to tune: the subprocess ending stops it too)
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=600) == 0
    text = (tmp_path / "log.txt").read_text()
    assert "preemption signal" in text and '"preempted_at_step"' in text, text[-3000:]
    first = int((tmp_path / "run" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= first < 2 * per_epoch
    end = max(first, per_epoch) + 2  # the resumed part crosses into epoch 2
    env["SFT_ARGS"] = f"{common} --max-steps {end}"
    r = subprocess.run(["bash", str(ROOT / "slurm" / "sft_distill.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = _history(uninterrupted(tmp_path_factory, tiny, packed))
    if len(ref) < end:  # (the signal landed after the first epoch: an uninterrupted run of its own)
        _sft(1, tmp_path / "ref", packed, tiny["mcore"], end)
        ref = _history(tmp_path / "ref")
    got, ref = _history(tmp_path / "run"), ref[:end]
    assert [h["step"] for h in got] == list(range(1, end + 1))
    assert [h["epoch"] for h in got][per_epoch - 1:per_epoch + 1] == [0, 1]
    assert [h["loss"] for h in got] == [h["loss"] for h in ref]
    assert [h["grad_norm"] for h in got] == [h["grad_norm"] for h in ref]


def test_refuses_an_init_checkpoint_whose_architecture_differs(tiny, packed, tmp_path):
    """SFT with a recipe naming another architecture than its --init checkpoint: refused naming the field, before
    training (the shipped training recipes name none and take the checkpoint's)."""
    import yaml

    from megatron_ring.config import load_recipe

    p = tmp_path / "sft_other.yaml"
    p.write_text(yaml.safe_dump({"base": "sft_distill_tiny",
                                 "hf_config": dict(load_recipe("tiny").hf_config, moe_intermediate_size=48)}))
    r = subprocess.run([PY, "-m", "megatron_ring.cli", "sft", "--recipe", str(p), "--data", str(packed),
                        "--init", str(tiny["mcore"]), "--out", str(tmp_path / "o"), "--max-steps", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "disagrees with the recipe's model: moe_intermediate_size: 64 != 48" in r.stderr, \
        r.stderr[-3000:]
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("first,then", [((1, []), (2, ["--ep", "2"])), ((2, ["--tp", "2"]), (1, []))],
                         ids=["1rank_to_ep2_dp2", "tp2_to_1rank"])
def test_training_checkpoint_resumes_at_another_layout(tiny, packed, tmp_path, tmp_path_factory, first, then):
    """A training checkpoint (model + optimizer moments + scheduler + data position) saved at one layout
    resumes at another: the losses after resuming equal the uninterrupted run's (to float32 round-off of a
    different reduction order), and they would not without the optimizer's moments (checked below)."""
    _sft(first[0], tmp_path / "run", packed, tiny["mcore"], 3, *first[1])
    _sft(then[0], tmp_path / "run", packed, tiny["mcore"], 5, *then[1])
    ref, got = _history(uninterrupted(tmp_path_factory, tiny, packed))[:5], _history(tmp_path / "run")
    assert [h["step"] for h in got] == [1, 2, 3, 4, 5]
    for r, g in zip(ref, got):
        assert abs(r["loss"] - g["loss"]) <= 1e-5 * r["loss"], (r, g)
        assert abs(r["grad_norm"] - g["grad_norm"]) <= 1e-4 * r["grad_norm"], (r, g)
