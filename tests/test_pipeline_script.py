"""slurm/pipeline.sh without a cluster (DRY_RUN=1 prints the sbatch commands): the stages in the recipe's order,
each one `afterok` on the one before, the tiny CPU overrides, and FROM=STAGE resubmitting only that stage and the
ones after it (a bad FROM is refused before anything is submitted)."""
import re
import subprocess

from .conftest import ROOT

STAGES = ["data", "sft", "select", "rl_stage1", "rl_stage2", "export", "eval_sft", "eval_final"]


def _dry(**env):
    return subprocess.run(["bash", "slurm/pipeline.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "RUN": "runs/p", **env})


def _jobs(stderr: str) -> list[tuple[str, str | None]]:
    out = []
    for line in stderr.splitlines():
        if " sbatch " in line:
            name = re.search(r"--job-name=(\S+)", line).group(1)
            dep = re.search(r"--dependency=afterok:(\S+)", line)
            out.append((name, dep.group(1) if dep else None))
    return out


def test_pipeline_chains_every_stage_afterok():
    r = _dry()
    assert r.returncode == 0, r.stderr
    jobs = _jobs(r.stderr)
    assert [n for n, _ in jobs] == STAGES
    assert [d for _, d in jobs] == [None] + [f"DRY_{n}" for n in STAGES[:-1]]
    assert "--gpus-per-node=0" in r.stderr and "--init runs/p/sft --out runs/p/rl_stage1" in r.stderr.replace("\\ ", " ")


def test_pipeline_from_a_stage_reuses_the_earlier_ones():
    r = _dry(FROM="rl_stage1")
    assert r.returncode == 0, r.stderr
    jobs = _jobs(r.stderr)
    assert [n for n, _ in jobs] == STAGES[3:] and jobs[0][1] is None  # nothing to wait for: its inputs exist
    assert all(f"skipped {n} (FROM=rl_stage1)" in r.stderr for n in STAGES[:3])
    bad = _dry(FROM="rl")
    assert bad.returncode == 2 and "FROM=rl: not a stage" in bad.stderr and " sbatch " not in bad.stderr
