"""The stage launcher on two Slurm nodes whose names sort against their numbers (``gpu9``, ``gpu10``:
``slurm/local/two_nodes.sh``, one start for this module), each in its own network, hostname and /dev, with fake GPUs
and, where the machine has cgroup v1, ConstrainDevices: what the one-node cluster cannot show (issue: Slurm on real GPU
clusters). Through sbatch and through submitit, ``slurm/preflight.sh`` (every rank, launched as every stage is)
reports: one launch per job, every step's GPUs openable, rank 0 on gpu10 (c10d's order) where the weight-sync address
points although the allocation's first host is gpu9; ``scancel`` ends a two-node job CANCELLED with no restart; an RL
job on both nodes preempted mid-run saves whole checkpoints and resumes after the step it saved."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PY, ROOT
from .test_slurm import _done, _job, _wait

TWO = Path(os.environ.get("SLURM_TWO_STATE", "/var/tmp/megatron-ring-slurm-2n"))
SMALL = ["--nodes=2", "--gpus-per-node=2", "--cpus-per-task=1", "--mem=2G", "--oversubscribe", "--time=00:20:00"]


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster, started once (idempotent); the environment its clients use."""
    if os.geteuid() != 0:
        pytest.skip("the two-node cluster needs root (network namespaces, daemons)")
    t0 = time.time()
    r = subprocess.run(["bash", "slurm/local/two_nodes.sh", "start"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    if r.returncode == 4:
        pytest.skip(f"this machine cannot make the two nodes' namespaces: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"two-node cluster up in {time.time() - t0:.1f} s: {r.stdout.strip()}")
    env = {**os.environ, "SLURM_CONF": str(TWO / "slurm.conf"), "MEGATRON_RING_GPU_DEVICES": "/dev/mr-gpus/nvidia*",
           "PY": PY}
    for k in ("NPROC", "OMP_NUM_THREADS", "SLURM_JOB_ID"):
        env.pop(k, None)
    return {"env": env, "cgroup": "proctrack/cgroup" in (TWO / "slurm.conf").read_text()}


def _sbatch(cluster, script: str, log: Path, *extra: str, **env) -> str:
    r = subprocess.run(["sbatch", "--parsable", *SMALL, *extra, f"--output={log}", f"slurm/{script}"], cwd=ROOT,
                       env={**cluster["env"], **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _reports(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.startswith('{"preflight"')]


def _check_preflight(cluster, report: dict) -> None:
    ranks = report["preflight"]
    assert report["ok"] and report["world"] == 4, report["problems"]
    assert sorted((r["host"], r["local_rank"]) for r in ranks) == [("gpu10", 0), ("gpu10", 1), ("gpu9", 0), ("gpu9", 1)]
    # c10d's rendezvous orders the nodes by name: rank 0 is on gpu10, the allocation's second host, and the
    # weight-sync address names it (the first host of `scontrol show hostnames`, gpu9, would name the wrong node)
    assert ranks[0]["host"] == "gpu10" and report["sync_address"][0] == "gpu10"
    assert all(r["sync_reached"] for r in ranks)
    assert all(r["bound_gpus"] == r["usable_gpus"] == 2 for r in ranks), ranks
    if cluster["cgroup"]:  # each step's devices are the job's two GPUs; the node's other two are refused (which two
        # depends on the job beside it)
        assert all(len(r["denied"]) == 2 for r in ranks), ranks


def test_sbatch_and_submitit_launch_once_with_gpus_in_every_step_and_rank0_where_the_sync_address_points(
        cluster, tmp_path, monkeypatch):
    from megatron_ring import launch

    log = tmp_path / "sbatch.log"
    jid = _sbatch(cluster, "preflight.sh", log)
    for k in ("SLURM_CONF", "MEGATRON_RING_GPU_DEVICES"):
        monkeypatch.setenv(k, cluster["env"][k])
    sub = launch.submit("preflight", {"PY": PY}, folder=tmp_path / "submitit", cluster="slurm",
                        overrides={"nodes": "2", "gpus-per-node": "2", "cpus-per-task": "1", "mem": "2G",
                                   "oversubscribe": True, "time": "00:20:00"})
    assert _wait(lambda: _done(jid, cluster["env"]), 300, f"job {jid}", log) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert text.count(f"job {jid} (restart 0)") == 1 and len(_reports(text)) == 1, text[-3000:]
    first = subprocess.run(["scontrol", "show", "hostnames", _job(jid, cluster["env"])["NodeList"]],
                           capture_output=True, text=True, env=cluster["env"]).stdout.split()
    assert first == ["gpu9", "gpu10"], first
    _check_preflight(cluster, _reports(text)[0])
    # submitit: a task per node; the stage runs once (task 0), in submitit's own step, which holds the GPUs too
    launch.wait(sub)
    outs = "".join(f.read_text() for f in sorted((tmp_path / "submitit").glob("*_log.out")))
    assert outs.count(f"job {sub.job_id} (restart 0)") == 1 and len(_reports(outs)) == 1, outs[-3000:]
    here = [json.loads(x) for x in outs.splitlines() if x.startswith('{"launcher_step"')]
    assert len(here) == 1 and here[0]["bound_gpus"] == here[0]["usable_gpus"] == 2, here
    _check_preflight(cluster, _reports(outs)[0])


def test_scancel_ends_a_two_node_job_cancelled_without_a_restart(cluster, tmp_path):
    log = tmp_path / "cancel.log"
    jid = _sbatch(cluster, "preflight.sh", log, PREFLIGHT_ARGS="--hold 300")
    _wait(lambda: _reports(log.read_text()) if log.exists() else None, 120, "the preflight report", log)
    subprocess.run(["scancel", jid], check=True, timeout=30, env=cluster["env"])
    assert _wait(lambda: _done(jid, cluster["env"]), 120, f"job {jid} to end", log) == "CANCELLED"
    _wait(lambda: "cancelled: the job ends (not requeued)" in log.read_text(), 60, "the batch shell's cancel path", log)
    time.sleep(3)
    job = _job(jid, cluster["env"])
    assert (job.get("JobState"), job.get("Restarts")) == ("CANCELLED", "0"), (job, log.read_text()[-2000:])


def test_an_rl_job_on_both_nodes_preempted_mid_run_saves_whole_checkpoints_and_resumes_after_them(
        cluster, tiny, data, tmp_path):  # noqa: F811
    """``sbatch slurm/rl_stage1.sh`` (tiny recipe, one rank per node: data parallel across gpu9 and gpu10), warned
    as ``--signal=B:USR1`` does: both ranks save at a step boundary, the job requeues itself and resumes after the
    saved step. Every checkpoint left is whole (both ranks' trainer state, the dist checkpoint's metadata), no
    partial one remains, and every step's metrics are there once."""
    from .test_slurm import _stage_env

    steps = 6
    out, log = tmp_path / "rl", tmp_path / "rl.log"
    env = _stage_env(data, tiny["mcore"], out)
    env["RL_ARGS"] = env["RL_ARGS"].replace("--steps 12", f"--steps {steps}")
    jid = _sbatch(cluster, "rl_stage1.sh", log, "--gpus-per-node=0", "--mem=5G", **env)

    def printed(after=None):
        text = log.read_text() if log.exists() else ""
        text = text.split(after, 1)[1] if after and after in text else ("" if after else text)
        return [json.loads(x)["step"] for x in text.splitlines() if x.startswith('{"step"')]

    _wait(lambda: max(printed(), default=-1) >= 2, 600, "step 2 of the two-node RL job", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, timeout=30, env=cluster["env"])
    end = _wait(lambda: _done(jid, cluster["env"]), 900, f"job {jid} to finish", log)
    assert end == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert text.count(f"job {jid} (restart 0) on 2 node(s) x 1") == 1 and f"job {jid} (restart 1)" in text, text[-3000:]
    before, after = printed()[: len(printed()) - len(printed("(restart 1)"))], printed("(restart 1)")
    assert 2 <= before[-1] < steps and after[0] == before[-1] + 1, (before, after)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"iter_{steps:07d}"
    assert not list(ckpts.glob("*.tmp")), list(ckpts.iterdir())
    for it in ckpts.glob("iter_*"):
        assert {p.name for p in it.glob("trainer_rank*.pt")} == {"trainer_rank00000.pt", "trainer_rank00001.pt"}, it
        assert (it / "dist" / ".metadata").exists() and (it / "megatron_ring.json").exists(), it
    assert (ckpts / f"iter_{before[-1]:07d}").exists()  # the step the preemption saved
    metrics = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(metrics)) == list(range(steps + 1)), metrics
