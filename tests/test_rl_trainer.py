"""The RL stage driver end to end on CPU (in-process rollouts, real rewards): the token budget is met
every step, GRPO mode trains every generated token, a run stopped after step k and resumed gives the same
per-step metrics as an uninterrupted run (bit-exact), on 1 rank and on 2 ranks (EP2 x DP2, weight sync
through the dist-checkpoint path), and the curves are drawn."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import PY, ROOT, shared


def _args(data, init, out, steps, *extra) -> list[str]:
    return ["--recipe", "rl_stage1_tiny", "--init", str(init), "--out", str(out),
            "--prompts", str(data / "rl_stage1" / "4_filtered.parquet"), "--tokenizer", str(data / "tokenizer"),
            "--eval-sets", str(data / "eval" / "math.parquet"), "--eval-limit", "4", "--eval-interval", "0",
            "--steps", "4", "--max-steps", str(steps), "--prompts-per-step", "4", "--samples-per-prompt", "4",
            "--max-new-tokens", "24", "--token-budget", "160", "--reward-workers", "1", "--save-interval", "0",
            "--lr", "1e-3", "--keep-uninformative", *map(str, extra)]  # a random model scores 0: keep its groups


def _rl(nproc, data, init, out, steps, *extra, env=None, ran=None):
    """The run's per-step records; ``ran`` (a list) gets the finished process (its stdout)."""
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           "-m", "megatron_ring.cli", "rl", *_args(data, init, out, steps, *extra)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    if ran is not None:
        ran.append(r)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


KEYS = ("pg_loss", "grad_norm", "entropy", "kl", "reward/mean", "tokens/kept", "tokens/generated", "response_length")


# The uninterrupted 4-step runs several tests compare with, run once per session (conftest.shared): on 1 rank with
# a save at every step by the time cadence and keep-last 2 (what the retention test checks; a save changes no
# figure, which the exact-resume comparison below shows), and at EP2 x DP2 (also the in-process reference of
# test_transport's server runs).
UNINTERRUPTED = {1: (["--save-every-minutes", "0.0001", "--keep-last", "2"], {"MEGATRON_RING_SIGNAL_LEAD": "0.05"}),
                 2: (["--ep", "2"], {})}


def uninterrupted(tmp_path_factory, tiny, data, nproc) -> tuple[list[dict], Path, str]:
    """(per-step records, the run's folder, its stdout) of the shared uninterrupted run on ``nproc`` ranks."""
    extra, env = UNINTERRUPTED[nproc]

    def build(d):
        ran = []
        _rl(nproc, data, tiny["mcore"], d / "run", 4, *extra, env=env, ran=ran)
        (d / "stdout.txt").write_text(ran[0].stdout)

    d = shared(tmp_path_factory, f"rl-uninterrupted-{nproc}", build)
    return [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()], d / "run", \
        (d / "stdout.txt").read_text()


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["--ep", "2"])], ids=["1rank", "2ranks_ep2_dp2"])
def test_budget_and_exact_resume(tiny, data, tmp_path, tmp_path_factory, nproc, extra):
    a, a_dir, _ = uninterrupted(tmp_path_factory, tiny, data, nproc)
    steps = [r for r in a if r["step"] > 0]
    assert [r["step"] for r in a] == [0, 1, 2, 3, 4] and "eval/math" in a[0] and "eval/math" in a[-1]
    for r in steps:  # Φ = 160 on each DP rank (EP2 x DP2: two), exactly: every group is kept here
        assert len(r["tokens/per_dp_rank"]) == nproc, r
        for generated, kept in r["tokens/per_dp_rank"]:
            assert kept == min(160, generated), r
        assert r["tokens/kept"] == sum(k for _, k in r["tokens/per_dp_rank"])
        assert r["logp_mismatch"] < 1e-4  # the rollout engine got exactly the trainer's weights
    assert any(r["kl"] > 0 for r in steps[1:]) and all(r["grad_norm"] > 0 for r in steps)
    _rl(nproc, data, tiny["mcore"], tmp_path / "b", 2, *extra)  # stopped after step 2 (checkpoint written)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    b = _rl(nproc, data, tiny["mcore"], tmp_path / "b", 4, *extra)  # resumed
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in KEYS} == {k: rb.get(k) for k in KEYS}, (ra, rb)
    if nproc == 1:
        r = subprocess.run([PY, "-m", "megatron_ring.cli", "rl-plot", str(a_dir)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and (a_dir / "rl_curves.png").stat().st_size > 10_000, r.stderr[-2000:]
        assert any((a_dir / "tb").iterdir())


def test_a_stop_planned_from_the_jobs_end_saves_asks_for_a_requeue_and_resumes_exactly(tiny, data, tmp_path,
                                                                                        tmp_path_factory):
    """Slurm's projected end of the job (SLURM_JOB_END_TIME) nearer than one more step and a save: the run stops at
    this step boundary with its checkpoint, without a signal, and leaves the job script its requeue file
    (MEGATRON_RING_REQUEUE_FILE); the requeued run resumes there and matches the uninterrupted run exactly."""
    import time

    a = uninterrupted(tmp_path_factory, tiny, data, 1)[0]
    ran, requeue = [], tmp_path / "logs" / ".requeue-42"
    _rl(1, data, tiny["mcore"], tmp_path / "b", 4, ran=ran,
        env={"SLURM_JOB_END_TIME": str(int(time.time()) + 20), "MEGATRON_RING_REQUEUE_FILE": str(requeue)})
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    assert requeue.read_text().strip() == "1" and '"stopped_for_time_at_step": 1' in ran[0].stdout
    b = _rl(1, data, tiny["mcore"], tmp_path / "b", 4)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in KEYS} == {k: rb.get(k) for k in KEYS}, (ra, rb)


def test_grpo_mode_trains_every_generated_token(tiny, data, tmp_path):
    g = _rl(1, data, tiny["mcore"], tmp_path / "g", 2, "--mode", "grpo")
    for r in g[1:]:
        assert r["tokens/kept"] == r["tokens/generated"] > 160


def test_refuses_a_start_checkpoint_that_disagrees_with_the_recipe(tiny, data, tmp_path):
    r = subprocess.run([PY, "-m", "megatron_ring.cli", "rl", "--recipe", "rl_stage1_tiny", "--init", str(tmp_path),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no checkpoints/selected or checkpoints/latest" in r.stderr


SNIPPET = """
import json, sys
from megatron_ring.config.recipe import load_recipe
from megatron_ring.rl.config import rl_config
from megatron_ring.rl.trainer import RLState
init, data, out, overrides = sys.argv[1:5]
r = load_recipe("rl_stage1_tiny")
cfg = rl_config(r, init=init, prompts=data + "/rl_stage1/4_filtered.parquet", tokenizer=data + "/tokenizer", out=out,
                eval_sets=[], prompts_per_step=4, lr=1e-4, lr_overrides=json.loads(overrides))
try:
    s = RLState(r, cfg)
except ValueError as e:
    print(json.dumps({"error": str(e)})); sys.exit(0)
names = {id(p): n for n, p in s.ddp.named_parameters()}
print(json.dumps([{"lr": g["lr"], "wd_mult": g.get("wd_mult", 1.0), "params": [names[id(p)] for p in g["params"]]}
                  for g in s.opt.param_groups]))
"""


def test_lr_overrides_give_a_parameter_group_its_own_lr(tiny, data, tmp_path):
    """The recipe's `lr_overrides` (name glob -> lr) become megatron-core param groups: the final norm gets its
    own lr (and keeps no weight decay), every other weight keeps the base lr; a glob matching nothing is refused."""
    def run(overrides, out):
        r = subprocess.run([PY, "-c", SNIPPET, str(tiny["mcore"]), str(data), str(out), json.dumps(overrides)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))  # one process: an in-process store
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    groups = run({"*final_layernorm*": 2e-2}, tmp_path / "a")
    special = [g for g in groups if any("final_layernorm" in n for n in g["params"])]
    assert len(special) == 1 and special[0]["lr"] == pytest.approx(2e-2) and special[0]["wd_mult"] == 0.0
    assert all("final_layernorm" in n for n in special[0]["params"])
    others = [g for g in groups if g is not special[0]]
    assert others and all(g["lr"] == pytest.approx(1e-4) for g in others)
    assert sum(len(g["params"]) for g in groups) > 50
    bad = run({"*no_such_weight*": 1e-3}, tmp_path / "b")
    assert "'*no_such_weight*' matches no parameter" in bad["error"]


def test_difficulty_script_shards_rollouts_like_one_run(tiny, data, tmp_path):
    """`slurm/difficulty.sh` (run here without Slurm): SHARDS rollout processes, each on every SHARDS-th chunk of
    prompts, give exactly the samples of one unsharded `megatron-ring rollouts` (each chunk's seed is its first
    row), and `data_tools difficulty` over the shard files writes its filtered prompts and report."""
    import pyarrow.parquet as pq

    prompts, out = data / "rl_stage2" / "4_filtered.parquet", tmp_path / "5_difficulty.parquet"
    flags = dict(K="2", MAX_NEW_TOKENS="12", TEMPERATURE="1.0")
    env = dict(os.environ, PY=PY, CKPT=str(tiny["mcore"]), PROMPTS=str(prompts), TOKENIZER=str(data / "tokenizer"),
               OUT=str(out), SHARDS="3", CHUNK="4", **flags)
    r = subprocess.run(["bash", "slurm/difficulty.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    whole = tmp_path / "whole.parquet"
    subprocess.run([PY, "-m", "megatron_ring.cli", "rollouts", "--ckpt", str(tiny["mcore"]), "--prompts", str(prompts),
                    "--tokenizer", str(data / "tokenizer"), "--out", str(whole), "--k", "2", "--max-new-tokens", "12",
                    "--temperature", "1.0", "--chunk", "4"], cwd=ROOT, check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    key = lambda x: (x["id"], x["sample"])  # noqa: E731
    shards = [pq.read_table(str(tmp_path / f"5_difficulty.rollouts-{i}.parquet")).to_pylist() for i in range(3)]
    n_rows = pq.read_metadata(str(prompts)).num_rows
    assert n_rows == 16 and [len(s) for s in shards] == [16, 8, 8]  # 4 chunks of 4 prompts x K=2: 0+3, 1, 2
    assert sorted(sum(shards, []), key=key) == sorted(pq.read_table(str(whole)).to_pylist(), key=key)
    report = json.loads((tmp_path / "5_difficulty.report.json").read_text())
    assert report["rated_prompts"] == 16 and report["rows_in"] == 16
    assert report["removed_by_reason"] == {"never_solved": 16}  # a random policy solves nothing: all dropped
    assert report["rows_kept"] == 0 and pq.read_metadata(str(out)).num_rows == 0


def test_refuses_a_start_checkpoint_whose_architecture_differs(tiny, data, tmp_path):
    """A recipe that names an architecture (here tiny's with 16 experts) and a real start checkpoint (8 experts):
    refused naming the field, before any model is built or any output is written."""
    import yaml

    from megatron_ring.config import load_recipe

    p = tmp_path / "rl_other.yaml"
    p.write_text(yaml.safe_dump({"base": "rl_stage1_tiny", "hf_config": dict(load_recipe("tiny").hf_config,
                                                                               num_experts=16)}))
    r = subprocess.run([PY, "-m", "megatron_ring.cli", "rl", "--recipe", str(p), "--init", str(tiny["mcore"]),
                        "--out", str(tmp_path / "o"), "--prompts", str(data / "rl_stage1" / "4_filtered.parquet"),
                        "--tokenizer", str(data / "tokenizer")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "checkpoint config.json disagrees with the recipe's model: num_experts: 8 != 16" \
        in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "o" / "checkpoints").exists()


def _learns(nproc, init, data, tmp_path, lr, *extra):
    out = tmp_path / f"learn_{nproc}_{lr}.json"
    cmd = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           str(ROOT / "tests" / "mp" / "case_rl_learns.py"), "--init", str(init), "--data", str(data), "--out", str(out),
           "--work", str(tmp_path / f"work_{nproc}_{lr}"), "--lr", str(lr), *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["--ep", "2", "--no-signal-on-odd-prompts"])],
                         ids=["1rank", "ep2_dp2_one_rank_without_signal"])
def test_rl_step_moves_the_policy_toward_what_is_rewarded(tiny, data, tmp_path, nproc, extra):
    """Full rl_steps with mixed rewards (a synthetic verifiable reward: first response token even), the production
    path's settings (drop all-equal groups, C3PO budget, π_ref, 2 mini-batches so π_old ≠ π_θ, TIS): the policy's
    probability of a rewarded first token rises; with lr 0 (the control, same seeds) it does not move. Under
    EP2 x DP2 one rank's prompts carry no signal: it trains on nothing and the step still learns from the other."""
    r = _learns(nproc, tiny["mcore"], data, tmp_path, 3e-3, *extra)
    lift = r["even_mass_after"] - r["even_mass_before"]
    assert lift > 0.04, r
    assert all(0.0 < s["reward/mean"] < 1.0 and 0 < s["tokens/kept"] <= 192 for s in r["steps"]), r["steps"]
    assert any(s["clipfrac"] > 0.05 for s in r["steps"]), r["steps"]  # the second mini-batch is off-policy
    if nproc == 2:
        # (whole groups of K = 8: one whose 8 samples happen to score alike is dropped, as on any rank)
        assert all(0 < n <= 32 and n % 8 == 0 for n in r["sequences_trained_per_rank"][0]), r
        assert all(n == 0 for n in r["sequences_trained_per_rank"][1]), r
    else:
        control = _learns(nproc, tiny["mcore"], data, tmp_path, 0.0, *extra)
        assert control["even_mass_after"] == pytest.approx(control["even_mass_before"], abs=1e-9)
        assert control["even_mass_before"] == pytest.approx(r["even_mass_before"], abs=1e-12)


def _wandb_history(run_dir) -> dict:
    """{tag: {step: value}} from an offline W&B run's .wandb file (a leveldb-style log of protobuf records: 32 KiB
    blocks, 7-byte record headers, records split FIRST/MIDDLE/LAST across blocks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (f,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    data, pos, buf, out = f.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = items.get("_step", rec.history.step.num)
                for k, v in items.items():
                    if not k.startswith("_"):
                        out.setdefault(k, {})[step] = v
    return out


def test_wandb_offline_holds_the_tensorboard_scalars_and_progress_is_live(tiny, data, tmp_path):
    """A short RL run with --wandb-project (offline): the W&B run holds exactly the TensorBoard file's tags, steps
    and values; stdout has a progress line per step with the ETA; stderr only the one summary line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_SILENT="true")
    cmd = [PY, "-m", "megatron_ring.cli", "rl", "--recipe", "rl_stage1_tiny", "--init", str(tiny["mcore"]),
           "--out", str(tmp_path / "w"), "--prompts", str(data / "rl_stage1" / "4_filtered.parquet"),
           "--tokenizer", str(data / "tokenizer"), "--eval-sets", str(data / "eval" / "math.parquet"),
           "--eval-limit", "4", "--eval-interval", "0", "--steps", "3", "--prompts-per-step", "2",
           "--samples-per-prompt", "2", "--max-new-tokens", "16", "--token-budget", "64", "--reward-workers", "1",
           "--save-interval", "0", "--keep-uninformative", "--wandb-project", "mr-test", "--wandb-mode", "offline"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    ea = EventAccumulator(str(tmp_path / "w" / "tb"))
    ea.Reload()
    tb = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    wb = _wandb_history(tmp_path / "w")
    assert len(tb) >= 15 and set(wb) == set(tb), sorted(set(wb) ^ set(tb))
    for tag, series in tb.items():
        assert set(wb[tag]) == set(series), tag  # the same steps (0: the start evaluation, 1..3)
        for step, v in series.items():
            assert abs(wb[tag][step] - v) <= 1e-6 * max(1.0, abs(v)), (tag, step, wb[tag][step], v)
    assert set(tb["rl/pg_loss"]) == {1, 2, 3} and set(tb["eval/math"]) == {0, 3}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[rl] step ")]
    assert [ln.split()[2] for ln in lines] == ["1/3", "2/3", "3/3"] and all(" eta " in ln for ln in lines), r.stdout
    err = r.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-ring: CPU mode:"), r.stderr


def test_retention_keeps_the_newest_milestones_and_pointed_checkpoints(tiny, data, tmp_path, tmp_path_factory):
    """keep_last / keep_every (the ling_lite RL recipes: 2 and 100): the rule on empty folders, then an RL run with
    a save every step (the time cadence, save_every_minutes, at 6 ms) and keep-last 2 ends with exactly its last two
    checkpoints."""
    from megatron_ring.training.state import prune_checkpoints

    c = tmp_path / "c"
    for i in range(1, 8):
        (c / f"iter_{i:07d}").mkdir(parents=True)
    (c / "iter_0000008.tmp").mkdir()  # a save in progress is not touched
    (c / "selected").write_text("iter_0000001\n")
    (c / "latest").write_text("iter_0000007\n")
    assert prune_checkpoints(c, 2, 3) == ["iter_0000002", "iter_0000004", "iter_0000005"]
    assert sorted(p.name for p in c.iterdir() if p.is_dir()) == \
        ["iter_0000001", "iter_0000003", "iter_0000006", "iter_0000007", "iter_0000008.tmp"]
    _, run, stdout = uninterrupted(tmp_path_factory, tiny, data, 1)  # a save at every step (time cadence), keep 2
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["iter_0000003", "iter_0000004"]
    assert (ck / "latest").read_text().strip() == "iter_0000004"
    # the preemption budget (same run): each step logs the measured wait for the boundary plus the slowest save;
    # a lead shorter than that (50 ms here) is warned about once, with the figures
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    need = {e.step: e.value for e in ea.Scalars("preempt/needed_s")}
    unsaved = {e.step: e.value for e in ea.Scalars("preempt/unsaved_s")}
    assert sorted(need) == [1, 2, 3, 4] and all(need[i + 1] >= need[i] > 0 for i in (1, 2, 3)), need
    assert need[2] > need[1]  # step 2's figure includes step 1's save
    assert all(0 < unsaved[i] < 60 for i in unsaved)  # a save every step: never more than one step unsaved
    warn = [ln for ln in stdout.splitlines() if "signal lead" in ln]
    assert len(warn) == 1 and "[rl] WARNING: the signal lead (0 s) is too short" in warn[0], warn


def test_a_preemption_inside_the_generate_phase_saves_at_once_and_resumes_exactly(tiny, data, tmp_path):
    """SIGTERM (what torchrun forwards from Slurm's signal) while step 2 generates: the generation stops at the next
    token, the step boundary's state is saved (nothing of step 2 has changed it) and the job exits long before the
    generation would have ended; the restart redoes step 2 and every step's metrics equal the uninterrupted run's."""
    import signal
    import time

    long = ("--max-new-tokens", "256", "--token-budget", "512")  # a generate phase of seconds
    a = _rl(1, data, tiny["mcore"], tmp_path / "a", 3, *long)
    gen_s = a[2]["time/generate"]
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node=1", "--standalone", "-m", "megatron_ring.cli", "rl",
           *_args(data, tiny["mcore"], tmp_path / "b", 3, *long)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = []
    for line in p.stdout:
        out.append(line)
        if "generating step 2:" in line:
            time.sleep(gen_s / 3)  # well inside the phase
            t0 = time.monotonic()
            p.send_signal(signal.SIGTERM)  # torchrun forwards it to the rank
            break
    rest, _ = p.communicate(timeout=300)
    took = time.monotonic() - t0
    log = "".join(out) + rest
    rec = next(json.loads(x[x.index("{"):]) for x in log.splitlines() if '"preempted_at_step"' in x)
    assert rec["preempted_at_step"] == 1 and rec["phase"] == "generate", log[-3000:]
    stopped_at = int(rec["detail"].split("token ")[1].split()[0])
    assert "stopped at token" in rec["detail"] and 0 < stopped_at < 256, rec
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    print(f"generate phase {gen_s:.2f} s uninterrupted; stopped at token {stopped_at}/256; signal -> exit {took:.2f} s "
          f"(save {rec['save_seconds']} s)")
    assert took < 30, (took, rec, gen_s)  # inside torchrun's grace before it kills the ranks
    b = _rl(1, data, tiny["mcore"], tmp_path / "b", 3, *long)  # the restart
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in KEYS} == {k: rb.get(k) for k in KEYS}, (ra, rb)


def test_a_preemption_inside_an_evaluation_drops_it_and_saves_the_step(tiny, data, tmp_path):
    """SIGTERM while the held-out evaluation after step 1 generates (the ling_lite recipes evaluate 500 problems
    at 24K tokens every 50 steps: far longer than a signal lead): the evaluation stops at the next token and is
    dropped, step 1 (already done) is saved, the job exits in seconds."""
    import signal
    import time

    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node=1", "--standalone", "-m", "megatron_ring.cli", "rl",
           *_args(data, tiny["mcore"], tmp_path / "e", 3, "--max-new-tokens", "256", "--token-budget", "512",
                  "--eval-interval", "1", "--eval-limit", "8")]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    out, t0 = [], None
    for line in p.stdout:
        out.append(line)
        if "evaluating after step 1" in line:
            time.sleep(0.3)
            t0 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=300)
    log = "".join(out) + rest
    assert t0 is not None, log[-3000:]  # (torchrun itself exits non-zero on the signal it forwarded)
    took = time.monotonic() - t0
    assert '"evaluation_dropped"' in log and "stopped at token" in log, log[-3000:]
    assert '{"preempted_at_step": 1}' in log, log[-3000:]
    assert (tmp_path / "e" / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    assert took < 30, took
