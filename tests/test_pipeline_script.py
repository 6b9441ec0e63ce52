"""slurm/pipeline.sh without a cluster (DRY_RUN=1 prints the sbatch commands): the stages in the recipe's order,
each one `afterok` on the one before, the tiny CPU overrides, and FROM=STAGE resubmitting only that stage and the
ones after it (a bad FROM is refused before anything is submitted); the difficulty filter between the RL stages
feeds stage 2 its output, and DIFFICULTY=0 (Ling-lite's default) leaves it out."""
import re
import subprocess

from .conftest import ROOT

STAGES = ["data", "sft", "select", "rl_stage1", "difficulty", "rl_stage2", "export", "eval_sft", "eval_final"]


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
    cmds = r.stderr.replace("\\ ", " ")
    assert "--gpus-per-node=0" in cmds and "--init runs/p/sft --out runs/p/rl_stage1" in cmds
    assert "OUT=runs/p/data/rl_stage2/5_difficulty.parquet" in cmds and "CKPT=runs/p/rl_stage1" in cmds
    assert "--prompts runs/p/data/rl_stage2/5_difficulty.parquet" in cmds  # stage 2 trains on what it kept


LING = {"SIZE": "ling_lite", "BASE": "/ckpt/ling_lite_mcore", "TOKENIZER": "/ckpt/ling_lite_hf", "DATA": "runs/p/data"}


def test_pipeline_without_the_difficulty_filter():
    for env in ({"DIFFICULTY": "0"}, LING):
        r = _dry(**env)
        assert r.returncode == 0, r.stderr
        jobs = _jobs(r.stderr)
        assert [n for n, _ in jobs] == [n for n in STAGES if n != "difficulty" and (n != "data" or "BASE" not in env)]
        assert dict(jobs)["rl_stage2"] == "DRY_rl_stage1" and "skipped difficulty (DIFFICULTY=0)" in r.stderr
        assert "--prompts runs/p/data/rl_stage2/4_filtered.parquet" in r.stderr.replace("\\ ", " ")


def test_pipeline_for_ling_lite_takes_the_real_model_data_and_tokenizer():
    """The GPU recipes never get the tiny data, random tiny model or tiny tokenizer: SIZE=ling_lite needs BASE,
    TOKENIZER and DATA (refused, naming the missing one, before anything is submitted), skips the data stage, and
    every stage reads them."""
    bad = _dry(SIZE="ling_lite", BASE="/ckpt/ling_lite_mcore")
    assert bad.returncode == 2 and "SIZE=ling_lite needs TOKENIZER=" in bad.stderr and " sbatch " not in bad.stderr
    r = _dry(**{**LING, "DATA": "/data/ring"})
    assert r.returncode == 0, r.stderr
    cmds = r.stderr.replace("\\ ", " ")
    assert "skipped data (SIZE=ling_lite: DATA=/data/ring)" in cmds and "--job-name=data " not in cmds
    assert "--data /data/ring/sft/packed.parquet --init /ckpt/ling_lite_mcore --out runs/p/sft" in cmds
    assert cmds.count("--tokenizer /ckpt/ling_lite_hf") == 2 and cmds.count("TOKENIZER=/ckpt/ling_lite_hf") == 3
    assert "runs/p/mcore" not in cmds and "runs/p/data" not in cmds


def test_pipeline_from_a_stage_reuses_the_earlier_ones():
    r = _dry(FROM="rl_stage1")
    assert r.returncode == 0, r.stderr
    jobs = _jobs(r.stderr)
    assert [n for n, _ in jobs] == STAGES[3:] and jobs[0][1] is None  # nothing to wait for: its inputs exist
    assert all(f"skipped {n} (FROM=rl_stage1)" in r.stderr for n in STAGES[:3])
    bad = _dry(FROM="rl")
    assert bad.returncode == 2 and "FROM=rl: not a stage" in bad.stderr and " sbatch " not in bad.stderr


def test_a_single_process_step_is_not_rank_0_of_the_job():
    """The RL stage's conversion runs in the batch shell, where Slurm exports SLURM_PROCID=0 / SLURM_NTASKS=N: through
    launch.sh's single_process it sees no rank variables (a single process, not rank 0 of N waiting for peers), no GPU,
    and every CPU as threads."""
    import os as _os

    env = dict(_os.environ, SLURM_PROCID="0", SLURM_NTASKS="16", SLURM_LOCALID="0", RANK="0", WORLD_SIZE="16",
               MASTER_PORT="29500", CUDA_VISIBLE_DEVICES="0,1", OMP_NUM_THREADS="1")
    code = "from megatron_ring.parallel.dist import detect_env; e = detect_env(); print(e.world_size, e.launcher)"
    r = subprocess.run(["bash", "-c", f'source slurm/launch.sh; single_process env; single_process "$PY" -c "{code}"'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
    assert not {"SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE", "MASTER_PORT"} & set(got), got
    assert got["CUDA_VISIBLE_DEVICES"] == "" and got["OMP_NUM_THREADS"] == str(len(_os.sched_getaffinity(0)))
    assert r.stdout.splitlines()[-1] == "1 single"
