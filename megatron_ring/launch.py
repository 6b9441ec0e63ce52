"""The Python submission API, on submitit: any stage (``slurm/<stage>.sh``) or a chain of them as Slurm jobs with the
resources the sbatch scripts declare, requeued on preemption; or, where no cluster answers, as local processes —
the same code path on a laptop.

    from megatron_ring import launch
    job = launch.submit("rl_stage1", {"RECIPE": "rl_stage1_tiny", "RL_ARGS": "..."})   # a submitit.Job
    jobs = launch.submit_chain([("sft", {...}), ("select", {...}), ("rl_stage1", {...})])  # afterok dependencies

    megatron-ring submit rl_stage1 --env RECIPE=rl_stage1_tiny RL_ARGS="..." [--local] [--sbatch nodes=1 ...] [--wait]

The job runs the stage script itself (its launcher: one torchrun per node, the rollout servers, PRINT_PLAN), so a
stage behaves as under ``sbatch``. Resources: the script's ``#SBATCH`` lines, then ``--sbatch`` overrides (the CPU
overrides of the tiny recipes are the pipeline's). Preemption: submitit's signal (USR2, ``signal_delay_s`` before the
end) reaches every step: torchrun forwards it to the ranks (``--signals-to-handle``), which checkpoint; the job
(``Checkpointable``) waits for the stage to exit and submitit requeues it; the restart resumes from ``latest``."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"data": "data.sh", "sft": "sft_distill.sh", "select": "select_ckpt.sh", "rl_stage1": "rl_stage1.sh",
           "difficulty": "difficulty.sh", "rl_stage2": "rl_stage2.sh", "export": "export.sh", "eval": "eval.sh",
           "serve": "serve.sh", "preflight": "preflight.sh"}
_SBATCH = re.compile(r"^#SBATCH\s+--([\w-]+)(?:[= ](\S+))?")
_NOT_SUBMITIT = {"output", "open-mode", "job-name", "signal", "requeue"}  # (submitit sets its own)


def script_of(stage: str) -> Path:
    if stage in SCRIPTS:
        return ROOT / "slurm" / SCRIPTS[stage]
    for p in (Path(stage), ROOT / "slurm" / stage):
        if p.suffix == ".sh" and p.exists():
            return p.resolve()
    raise ValueError(f"stage {stage!r}: one of {sorted(SCRIPTS)} or a slurm/*.sh path")


def sbatch_resources(script: str | Path) -> dict[str, str | bool]:
    """The script's ``#SBATCH --key[=value]`` lines (flags as True), as sbatch reads them."""
    out: dict[str, str | bool] = {}
    for line in Path(script).read_text().splitlines():
        m = _SBATCH.match(line)
        if m:
            out[m.group(1)] = m.group(2) if m.group(2) is not None else True
    return out


def _minutes(t: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = t.rpartition("-") if "-" in t else ("0", "", t)
    parts = [int(x) for x in rest.split(":")]
    if "-" in t:
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, parts[0], parts[1]), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def slurm_parameters(script: str | Path, overrides: dict | None = None) -> dict:
    """submitit's Slurm parameters for a stage script: its #SBATCH lines with ``overrides`` (sbatch option names)
    on top. The signal lead of ``--signal=B:USR1@N`` becomes submitit's ``signal_delay_s``."""
    res = {**sbatch_resources(script), **(overrides or {})}
    lead = re.search(r"@(\d+)", str(res.get("signal", ""))) if res.get("signal") else None
    p: dict = {"slurm_signal_delay_s": int(lead.group(1)) if lead else 120, "slurm_additional_parameters": {}}
    named = {"nodes": "slurm_nodes", "cpus-per-task": "slurm_cpus_per_task", "gpus-per-node": "slurm_gpus_per_node",
             "mem": "slurm_mem", "partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos"}
    for k, v in res.items():
        if k in _NOT_SUBMITIT or v is False:
            continue
        if k in named:
            p[named[k]] = int(v) if k in ("nodes", "cpus-per-task", "gpus-per-node") else v
        elif k == "time":
            p["timeout_min"] = _minutes(str(v))
        elif k == "ntasks-per-node":
            p["tasks_per_node"] = int(v)
        else:  # e.g. exclusive, oversubscribe, constraint, dependency
            p["slurm_additional_parameters"][k.replace("-", "_")] = v
    return p


def cluster_answers() -> bool:
    if not shutil.which("sbatch"):
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and bool(r.stdout.strip())


MAX_TIMEOUT_REQUEUES = 10**6  # (submitit's slurm_max_num_timeout)


class StageJob:
    """One stage script run as a job (picklable; submitit calls it on the node, ``checkpoint`` on preemption)."""

    def __init__(self, stage: str, env: dict[str, str]):
        self.stage, self.env, self.proc = stage, dict(env), None

    def __call__(self) -> dict:
        task = int(os.environ.get("SLURM_PROCID", "0"))
        if task:  # submitit calls this in every task of the job (nodes x tasks per node); the stage script starts
            # its own srun steps over all the nodes, so it runs once: in task 0
            return {"stage": self.stage, "returncode": 0, "task": task, "ran": False}
        env = {**os.environ, **self.env, "MEGATRON_RING_SUBMITIT": "1", "REPO": str(ROOT)}
        self.proc = subprocess.Popen(["bash", str(script_of(self.stage))], cwd=ROOT, env=env)
        while (rc := self.proc.poll()) is None:  # (not proc.wait(): submitit's signal handler, which calls
            time.sleep(0.5)                      #  checkpoint() -> proc.wait(), would deadlock on its lock)
        if rc != 0:
            raise RuntimeError(f"stage {self.stage} ({script_of(self.stage).name}) exited with {rc}")
        return {"stage": self.stage, "returncode": rc}

    def checkpoint(self, *args, **kwargs):
        """Preempted: the ranks got the signal as well and are writing their checkpoint; once the stage has
        exited, the same job is submitted again (submitit requeues it) and resumes from ``latest``."""
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # (the stage script's trap: pass it on to the ranks, no requeue)
            self.proc.wait()
        print(f"[launch] {self.stage}: checkpoint written, requeueing", flush=True)
        return submitit.helpers.DelayedSubmission(StageJob(self.stage, self.env))


def executor(stage: str, folder: str | Path = "logs/submitit", cluster: str | None = None,
             overrides: dict | None = None):
    """A submitit executor for ``stage``: Slurm when a cluster answers (``cluster``: "slurm" / "local" to choose)."""
    import submitit

    cluster = cluster or ("slurm" if cluster_answers() else "local")
    # requeued on every time-out (submitit's default gives up after 3: a long RL run would end FAILED)
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=MAX_TIMEOUT_REQUEUES)
    p = slurm_parameters(script_of(stage), overrides)
    if cluster == "slurm":
        p["slurm_additional_parameters"].setdefault("requeue", True)
        # the job's own step overlaps the stage's srun steps (torchrun, servers: they take the node's GPUs) and sees
        # the GPUs itself (a --gpus-per-node=0 step cannot open a GPU under cgroup ConstrainDevices, and from Slurm
        # 23.11 on its 0 reaches the nested steps' environment)
        p["slurm_srun_args"] = ["--overlap"]
        ex.update_parameters(name=script_of(stage).stem, **p)
    else:
        ex.update_parameters(name=script_of(stage).stem, timeout_min=p.get("timeout_min", 60))
    return ex


def submit(stage: str, env: dict[str, str] | None = None, after: list | None = None, **kw):
    """One stage as a job; ``after``: jobs (or ids) it runs after (``afterok``; a local chain waits instead)."""
    ex = executor(stage, **kw)
    if after and ex.cluster == "slurm":
        ids = ":".join(str(getattr(j, "job_id", j)) for j in after)
        ex.update_parameters(slurm_additional_parameters={**ex.parameters.get("additional_parameters", {}),
                                                          "dependency": f"afterok:{ids}", "kill_on_invalid_dep": "yes"})
    elif after:
        for j in after:
            if hasattr(j, "result"):
                j.result()  # (raises when it failed: the chain stops as afterok would)
    env = dict(env or {})
    gpus = ex.parameters.get("gpus_per_node") if ex.cluster == "slurm" else None
    if gpus:  # the stage's srun steps take the node's GPUs; the launcher counts them from here
        env.setdefault("MEGATRON_RING_GPUS_PER_NODE", str(gpus))
    return ex.submit(StageJob(stage, env))


def submit_chain(stages: list[tuple[str, dict]], **kw) -> list:
    jobs: list = []
    for stage, env in stages:
        jobs.append(submit(stage, env, after=jobs[-1:] or None, **kw))
    return jobs


def wait(job, poll_s: float = 2.0):
    """The job's result, or its error. A Slurm job that leaves the queue without a result (its step failed before
    the function ran, or it was cancelled) is an error naming its log, not an endless wait (submitit reads job
    states from sacct, which a cluster without accounting does not answer)."""
    import logging

    logging.getLogger("submitit").setLevel(logging.ERROR)
    if type(job).__name__ != "SlurmJob":
        return job.result()
    sub = getattr(job, "_sub_jobs", None)
    job = sub[0] if sub else job  # a job of several tasks: task 0 runs the stage, the others return at once
    while not job.paths.result_pickle.exists():
        q = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"], capture_output=True, text=True)
        if q.returncode == 0 and not q.stdout.strip():
            time.sleep(poll_s)  # (the result file may land just after the job leaves the queue)
            if not job.paths.result_pickle.exists():
                err = Path(job.paths.stderr)
                tail = err.read_text()[-2000:] if err.exists() else ""
                raise RuntimeError(f"job {job.job_id} left the queue without a result; {err}:\n{tail}")
        time.sleep(poll_s)
    return job.result()


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="megatron-ring submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", help=f"one of {', '.join(SCRIPTS)} (or a slurm/*.sh path)")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="the stage script's variables")
    ap.add_argument("--sbatch", nargs="*", default=[], metavar="OPTION=VALUE",
                    help="override #SBATCH lines (sbatch option names, e.g. nodes=1 gpus-per-node=0 oversubscribe)")
    ap.add_argument("--after", nargs="*", default=[], help="job ids this one runs after (afterok)")
    ap.add_argument("--local", action="store_true", help="a local process even where a cluster answers")
    ap.add_argument("--folder", default="logs/submitit")
    ap.add_argument("--wait", action="store_true", help="wait for the job and fail with it")
    a = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in a.env)
    over = {kv.split("=", 1)[0]: (kv.split("=", 1)[1] if "=" in kv else True) for kv in a.sbatch}
    job = submit(a.stage, env, after=a.after or None, folder=a.folder, cluster="local" if a.local else None,
                 overrides=over)
    print(job.job_id, flush=True)
    if a.wait:
        try:
            wait(job)
        except Exception as e:  # noqa: BLE001 — the job's own error, in one line
            why = [ln for ln in str(e).splitlines() if "exited with" in ln or "left the queue" in ln]
            print(f"megatron-ring submit: job {job.job_id} ({a.stage}) failed: {(why or [str(e)])[-1].strip()} "
                  f"(log: {job.paths.stdout})", file=sys.stderr)
            return 1
    return 0
