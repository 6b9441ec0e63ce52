"""The stage scripts under a real slurmctld (``slurm/local/start.sh`` brings one up; .ci/run does): the headline
``sbatch slurm/rl_stage1.sh`` on the tiny recipe completes and leaves a checkpoint and metrics; a job preempted
twice mid-run — ``--signal=B:USR1`` style (the batch shell gets USR1: checkpoint, then the script requeues itself)
and an external ``scontrol requeue`` — resumes from ``latest`` and finishes with per-step metrics bit-equal to the
uninterrupted job's, read from the files the jobs wrote."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PY, ROOT
from .test_rl_trainer import KEYS


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return r.returncode == 0 and any(s in r.stdout for s in ("idle", "mixed", "allocated"))


pytestmark = pytest.mark.skipif(not _cluster_up(), reason="no Slurm cluster answers (bash slurm/local/start.sh)")
STEPS = 12


def _stage_env(data, init, out: Path) -> dict[str, str]:  # noqa: F811
    rl_args = (f"--init {init} --out {out} --prompts {data / 'rl_stage1' / '4_filtered.parquet'} "
               f"--tokenizer {data / 'tokenizer'} --eval-sets {data / 'eval' / 'math.parquet'} --eval-limit 4 "
               f"--eval-interval 0 --steps {STEPS} --prompts-per-step 8 --samples-per-prompt 8 --max-new-tokens 64 "
               f"--token-budget 1024 --reward-workers 1 --save-interval 0 --lr 1e-3 --keep-uninformative")
    return {"RECIPE": "rl_stage1_tiny", "RL_ARGS": rl_args, "NPROC": "1", "OMP_NUM_THREADS": "1", "PY": PY}


def _submit(data, init, out: Path, log: Path) -> str:  # noqa: F811
    env = dict(os.environ, **_stage_env(data, init, out))
    r = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=6G", "--oversubscribe",
                        "--time=00:30:00", f"--output={log}", "slurm/rl_stage1.sh"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job(jid: str, env: dict | None = None) -> dict:
    r = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True, text=True, timeout=30,
                       env=env)
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def _wait(cond, timeout: float, what: str, log: Path):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; job log:\n" + (log.read_text()[-3000:] if log.exists() else ""))


def _done(jid: str, env: dict | None = None):
    st = _job(jid, env).get("JobState", "")
    return st if st in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None


def _metrics(out: Path) -> dict[int, dict]:
    f = out / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
    return {r["step"]: r for r in rows}  # a resumed job appends; the last record of a step wins


def _logged(log: Path, after: str | None = None) -> int:
    """The last step the job printed (metrics.jsonl is written with the checkpoints; stdout as it goes)."""
    text = log.read_text() if log.exists() else ""
    if after:
        text = text.split(after, 1)[1] if after in text else ""
    steps = [json.loads(x)["step"] for x in text.splitlines() if x.startswith('{"step"')]
    return max(steps, default=-1)


def _stop_step(log: Path, restart: int) -> int:
    """The last step the job printed before its ``restart``-th start."""
    text = log.read_text()
    head = text.split(f"(restart {restart})")[0]
    steps = [json.loads(x)["step"] for x in head.splitlines() if x.startswith('{"step"')]
    return max(steps, default=-1)


@pytest.fixture(scope="module")
def uninterrupted(tiny, data, tmp_path_factory):  # noqa: F811
    """The headline use, uninterrupted: `sbatch slurm/rl_stage1.sh` on the tiny recipe; its per-step metrics."""
    d = tmp_path_factory.mktemp("sbatch_a")
    a_log = d / "a.log"
    ja = _submit(data, tiny["mcore"], d / "a", a_log)
    assert _wait(lambda: _done(ja), 900, f"job {ja}", a_log) == "COMPLETED", a_log.read_text()[-3000:]
    a = _metrics(d / "a")
    assert sorted(a) == list(range(STEPS + 1)) and "eval/math" in a[0] and "eval/math" in a[STEPS]
    assert (d / "a" / "checkpoints" / "latest").read_text().strip() == f"iter_{STEPS:07d}"
    assert f"job {ja} (restart 0)" in a_log.read_text()
    return a


def test_sbatch_rl_stage1_completes_and_a_preempted_job_resumes_bit_exact(tiny, data, tmp_path,  # noqa: F811
                                                                          uninterrupted):
    a = uninterrupted

    # the same job, preempted twice
    b_log, b = tmp_path / "b.log", tmp_path / "b"
    jb = _submit(data, tiny["mcore"], b, b_log)
    _wait(lambda: _logged(b_log) >= 2, 300, "step 2 of the job to be preempted", b_log)
    # what `#SBATCH --signal=B:USR1@N` delivers before the time limit: USR1 to the batch shell
    subprocess.run(["scancel", "--signal=USR1", "--batch", jb], check=True, timeout=30)
    _wait(lambda: int(_job(jb).get("Restarts", "0")) >= 1, 300, "the job to requeue itself", b_log)
    _wait(lambda: f"job {jb} (restart 1)" in b_log.read_text(), 300, "the restart", b_log)
    # an external requeue (scontrol requeue / a node failure) while the restarted job trains
    _wait(lambda: _logged(b_log, after="(restart 1)") >= _stop_step(b_log, 1) + 2, 300, "the restarted job to train",
          b_log)
    subprocess.run(["scontrol", "requeue", jb], check=True, timeout=30)
    assert _wait(lambda: _done(jb), 900, f"job {jb} to finish", b_log) == "COMPLETED", b_log.read_text()[-3000:]
    log = b_log.read_text()
    assert "preemption signal: asking the ranks to checkpoint" in log and f"job {jb} (restart 2)" in log
    s1, s2 = _stop_step(b_log, 1), _stop_step(b_log, 2)
    assert 2 <= s1 < s2 < STEPS, (s1, s2)  # both interruptions landed mid-run
    after = [json.loads(x)["step"] for x in log.split("(restart 1)", 1)[1].splitlines() if x.startswith('{"step"')]
    assert after[0] == s1 + 1, after  # resumed from the checkpoint the signal made (not from the start)
    got = _metrics(b)
    assert sorted(got) == list(range(STEPS + 1))
    for s in range(STEPS + 1):
        assert {k: a[s].get(k) for k in KEYS} == {k: got[s].get(k) for k in KEYS}, (s, a[s], got[s])
    assert (b / "checkpoints" / "latest").read_text().strip() == f"iter_{STEPS:07d}"


def test_a_cancelled_job_stays_cancelled(tiny, data, tmp_path):  # noqa: F811
    """`scancel` sends TERM (no warning signal first): the ranks are asked to save, and the job ends CANCELLED with
    no restart. (`scontrol requeue` takes a cancelled or completing job back: a script that requeued on TERM turned
    every cancel into a new run holding the nodes again.)"""
    log = tmp_path / "c.log"
    jid = _submit(data, tiny["mcore"], tmp_path / "c", log)
    _wait(lambda: _logged(log) >= 1, 300, "step 1 of the job to be cancelled", log)
    subprocess.run(["scancel", jid], check=True, timeout=30)
    assert _wait(lambda: _done(jid), 120, f"job {jid} to end", log) == "CANCELLED"
    time.sleep(20)  # (past KillWait: the batch shell has had every chance to requeue)
    job = _job(jid)
    assert (job.get("JobState"), job.get("Restarts")) == ("CANCELLED", "0"), (job, log.read_text()[-2000:])
    assert "the job will not be requeued" in log.read_text()


def _gres_gpus() -> int:
    r = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=20)
    m = [int(g.split(":")[-1]) for g in r.stdout.split() if g.startswith("gpu:")]
    return max(m, default=0)


def test_gpu_scripts_on_fake_gpus_plan_from_slurms_binding_and_refuse_without_cuda(tmp_path):
    """The ling_lite scripts' own #SBATCH lines (8 GPUs per node, whole nodes; CPUs, memory and time scaled down to
    this box) are accepted and scheduled on the local cluster's fake GPUs (GRES gpu:8): the plan comes from Slurm's
    binding; without PRINT_PLAN a stage that needs CUDA stops in seconds with the reason (exit 3), and RL on one
    node (4 trainer GPUs cannot hold EP8) is refused (exit 2) before any conversion or server."""
    if _gres_gpus() < 8:
        pytest.skip("the local cluster has no fake GPUs (slurm/local/start.sh could not create device nodes)")
    small = ["--nodes=1", "--cpus-per-task=1", "--mem=2G", "--time=00:30:00"]  # (longer than the signal lead)

    def run(script, log, **env):
        r = subprocess.run(["sbatch", "--parsable", *small, f"--output={log}", f"slurm/{script}"], cwd=ROOT,
                           env={**{k: v for k, v in os.environ.items() if k not in ("NPROC", "OMP_NUM_THREADS")},
                                "PY": PY, **env},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        jid = r.stdout.strip().split(";")[0]
        t0 = time.time()
        state = _wait(lambda: _done(jid), 300, f"job {jid}", log)
        return state, _job(jid).get("ExitCode"), time.time() - t0, log.read_text()

    state, code, _, log = run("sft_distill.sh", tmp_path / "plan.log", PRINT_PLAN="1")
    assert state == "COMPLETED", log
    assert "gpus_per_node=8 gpu_binding=0,1,2,3,4,5,6,7 ranks_per_node=8 world=8" in log
    assert "sft on 8 GPUs x 80 GiB" in log and "--nproc-per-node=8" in log
    state, code, took, log = run("sft_distill.sh", tmp_path / "cuda.log")
    assert (state, code) == ("FAILED", "3:0") and "torch sees no CUDA device" in log and took < 120, (took, log)
    state, code, _, log = run("rl_stage1.sh", tmp_path / "rl.log", PRINT_PLAN="1")
    assert (state, code) == ("FAILED", "2:0") and "do not divide into TP4 x PP1 x CP1 and EP8" in log, log
    assert "rollout server" not in log


def test_submitit_runs_the_stage_as_sbatch_does_on_slurm_and_locally_and_requeues_on_preemption(
        tiny, data, tmp_path, uninterrupted):  # noqa: F811
    """megatron_ring.launch (submitit): the same stage script with the same resources as a Slurm job and as a local
    process gives the sbatch job's per-step metrics; a job preempted the way submitit is warned (USR2 to every step:
    torchrun passes it to the rank, which checkpoints; the job requeues itself) resumes and ends with them too."""
    from megatron_ring import launch

    cpu = {"nodes": "1", "gpus-per-node": "0", "cpus-per-task": "1", "mem": "6G", "oversubscribe": True,
           "time": "00:30:00"}
    jobs = {}
    for way in ("slurm", "local", "preempted"):  # (the local one runs while the first Slurm job does: 2 CPUs)
        env = _stage_env(data, tiny["mcore"], tmp_path / way)
        jobs[way] = launch.submit("rl_stage1", env, folder=tmp_path / f"submitit_{way}",
                                  cluster="local" if way == "local" else "slurm", overrides=cpu)
        if way == "local":
            assert type(jobs[way]).__name__ == "LocalJob"
            launch.wait(jobs[way])
    # a job of 2 tasks (submitit calls the function in each): the stage script runs once
    once = launch.submit("sft", {"RECIPE": "sft_distill_tiny", "PRINT_PLAN": "1", "PY": PY},
                         folder=tmp_path / "submitit_once", cluster="slurm",
                         overrides={**cpu, "ntasks-per-node": "2", "mem": "2G"})
    j = jobs["preempted"]
    log = Path(j.paths.stdout)
    _wait(lambda: _logged(log) >= 2, 600, "step 2 of the submitit job", log)
    subprocess.run(["scancel", "--signal=USR2", str(j.job_id)], check=True, timeout=30)  # what --signal=USR2@N sends
    _wait(lambda: f"job {j.job_id} (restart 1)" in log.read_text(), 300, "the submitit job's restart", log)
    for way in ("slurm", "preempted"):
        launch.wait(jobs[way])
    launch.wait(once)
    plans = [ln for f in (tmp_path / "submitit_once").glob("*.out") for ln in f.read_text().splitlines()
             if ln.startswith("[plan] every node: trainer")]
    assert len(plans) == 1, plans
    text = log.read_text()
    assert "submitit requeues the job" in text and 2 <= _stop_step(log, 1) < STEPS, text[-3000:]
    after = [json.loads(x)["step"] for x in text.split("(restart 1)", 1)[1].splitlines() if x.startswith('{"step"')]
    assert after[0] == _stop_step(log, 1) + 1, after  # resumed from the checkpoint the signal made, not from scratch
    for way in ("slurm", "local", "preempted"):
        got = _metrics(tmp_path / way)
        assert sorted(got) == list(range(STEPS + 1)), (way, sorted(got))
        for s in range(STEPS + 1):
            assert {k: uninterrupted[s].get(k) for k in KEYS} == {k: got[s].get(k) for k in KEYS}, (way, s)
