"""The GPU job scripts, right by construction for N nodes x G GPUs, checked without GPUs: ``PRINT_PLAN=1`` makes every
stage print what it would run (per node: ranks, GPUs, ports, commands, environment, the memory plan) from the
allocation's own variables, here those of a 1- and a 2-node allocation of 8 GPUs each; under the local slurmctld
(fake GRES ``gpu:8``) the ``ling_lite`` scripts are accepted and scheduled, print their plan from Slurm's real GPU
binding, and a stage that needs CUDA stops at once with the reason."""
import os
import re
import shlex
import shutil
import subprocess

import pytest

from .conftest import PY, ROOT

pytestmark = pytest.mark.skipif(not shutil.which("scontrol"), reason="Slurm's client (scontrol) is not installed")


def _plan(script: str, nodes: int, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("CUDA_VISIBLE_DEVICES",
                                                                                          "NPROC", "OMP_NUM_THREADS",
                                                                                          "TMPDIR", "TRITON_CACHE_DIR")}
    e.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=f"gpu[1-{nodes}]" if nodes > 1 else "gpu1",
             SLURM_JOB_NUM_NODES=str(nodes), SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64", PRINT_PLAN="1", PY=PY,
             **env)
    return subprocess.run(["bash", f"slurm/{script}"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)


def _fields(out: str) -> dict[str, str]:
    got = {}
    for line in out.splitlines():
        if line.startswith("[plan] ") and " :: " not in line:
            got.update(kv.split("=", 1) for kv in line[7:].split() if "=" in kv and not kv.startswith("env"))
    return got


def _cmds(out: str) -> dict[str, list[str]]:
    return {ln[7:].split(" :: ", 1)[0]: shlex.split(ln.split(" :: ", 1)[1]) for ln in out.splitlines()
            if ln.startswith("[plan] ") and " :: " in ln}


@pytest.mark.parametrize("nodes", [1, 2])
def test_sft_plan_one_rank_per_gpu_on_every_node(nodes):
    r = _plan("sft_distill.sh", nodes)
    assert r.returncode == 0, r.stderr[-3000:]
    f, cmd = _fields(r.stdout), _cmds(r.stdout)["every node: trainer"]
    assert (f["stage"], f["nodes"], f["ranks_per_node"], f["world"]) == ("sft", str(nodes), "8", str(8 * nodes))
    assert f["hosts"] == ",".join(f"gpu{i + 1}" for i in range(nodes)) and f["rendezvous"] == "gpu1:14242"
    assert "fits" in r.stdout and f"sft on {8 * nodes} GPUs" in r.stdout  # the memory plan for this world
    assert cmd[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]  # one torchrun per node
    assert {"--nproc-per-node=8", f"--nnodes={nodes}", "--rdzv-endpoint=gpu1:14242", "--shutdown-timeout=540",
            "--rdzv-id=4242"} <= set(cmd) and cmd[-4:] == ["megatron_ring.cli", "sft", "--recipe", "sft_distill_ling_lite"]
    assert "[plan] env CUDA_DEVICE_MAX_CONNECTIONS=1" in r.stdout and "[plan] env OMP_NUM_THREADS=8" in r.stdout
    assert "[plan] env TRITON_CACHE_DIR=/tmp/triton_cache_4242" in r.stdout  # node-local, not the shared home
    assert "[plan] env MEGATRON_RING_SIGNAL_LEAD=300" in r.stdout  # the script's --signal=B:USR1@300, for the check
    assert "NPROC" not in " ".join(cmd) and "CUDA_VISIBLE_DEVICES" not in " ".join(cmd)  # Slurm's binding stays


def test_rl_plan_two_nodes_trainers_and_servers_split_each_nodes_gpus():
    r = _plan("rl_stage1.sh", 2, RL_ARGS="--init runs/x/sft --out /scratch/ring/rl1")
    assert r.returncode == 0, r.stderr[-3000:]
    f, cmds = _fields(r.stdout), _cmds(r.stdout)
    assert (f["ranks_per_node"], f["world"], f["trainer_gpus"]) == ("4", "8", "0:4")
    assert (f["start"], f["out"], f["context"]) == ("runs/x/sft", "/scratch/ring/rl1", str(2048 + 24576))
    conv = cmds["batch node: start checkpoint -> HF"]
    assert conv[:2] == ["single_process", conv[1]] and conv[2:6] == ["-m", "megatron_ring.cli", "export", "--ckpt"]
    # (written beside its place and renamed when whole: a requeue never takes a half-written export for done)
    assert conv[6] == "runs/x/sft" and conv[conv.index("--out") + 1] == "/scratch/ring/rl1/rollout_init_hf.partial"
    assert conv[-2:] == ["--dtype", "bf16"]  # a run dir resolved by `export`, the --init/--out the job was given
    ports = {int(f["rendezvous"].split(":")[1]), int(f["server_port"]), int(f["weight_sync"].split(":")[1])}
    assert len(ports) == 3 and 10000 <= int(f["rendezvous"].split(":")[1]) < 15000
    # all below Linux's ephemeral range (32768-60999), where an outgoing connection can hold a port a bind needs
    assert 15000 <= int(f["server_port"]) < 20000 <= int(f["weight_sync"].split(":")[1]) < 30000 < 32768
    for host in ("gpu1", "gpu2"):
        srv = cmds[f"node {host}: rollout server"]
        assert srv[:6] == ["srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", host]
        assert srv[6] == f"--output=/scratch/ring/rl1/logs/sglang-{host}.log"  # SGLang's own log, kept per node
        assert srv[7].endswith("slurm/with_gpus.sh") and srv[8:10] == ["4", "4"]  # the node's GPUs 4-7
        assert {"--tp-size", "4", "--context-length", str(2048 + 24576), "--allow-beyond-positions"} <= set(srv)
        # dedicated rollout GPUs: no memory saver (it would only shrink SGLang's KV pool); the recipe asks for no
        # reproducible rollouts (deterministic_rollouts: false), so SGLang runs at full speed
        assert "--enable-memory-saver" not in srv and "--enable-deterministic-inference" not in srv
    # every node's reward sandbox probed before anything is converted or started (rank 0 grades, on any node)
    sb = cmds["every node: reward sandbox check"]
    assert sb[:5] == ["srun", "--overlap", "--nodes=2", "--ntasks-per-node=1", sb[4]] and sb[-3:] == \
        ["-m", "megatron_ring.rewards.sandbox", "--check"]
    lines = [ln.split(" :: ")[0] for ln in r.stdout.splitlines() if " :: " in ln]
    assert lines.index("[plan] every node: reward sandbox check") < lines.index("[plan] batch node: start checkpoint -> HF")
    probe = subprocess.run([PY, "-m", "megatron_ring.rewards.sandbox", "--check"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode == 0 and "[sandbox]" in probe.stdout, (probe.stdout, probe.stderr)
    tr = cmds["every node: trainer"]
    assert tr[3].endswith("slurm/with_gpus.sh") and tr[4:6] == ["0", "4"] and "--nproc-per-node=4" in tr
    # the script's --signal=B:USR1@600, but torchrun kills the ranks 540 s after passing it on: they plan with 540
    assert "[plan] env MEGATRON_RING_SIGNAL_LEAD=540" in r.stdout and "shutdown_timeout=540" in r.stdout
    i = tr.index("--sglang-urls")
    urls = ["http://gpu1:19242", "http://gpu2:19242"]
    assert tr[i + 1:i + 3] == urls and tr[i + 5] == "--init"
    assert tr[tr.index("--out") + 1] == "/scratch/ring/rl1"  # RL_ARGS reach the trainer too
    # two servers: SGLang's router on the batch node takes the samples' requests, on a port (and the next one,
    # its metrics) of its own range
    rt = cmds["batch node: router"]
    port = int(rt[rt.index("--port") + 1])
    assert tr[i + 3:i + 5] == ["--sglang-router", f"http://gpu1:{port}"] and f["router"] == f"http://gpu1:{port}"
    assert 30000 <= port < 32000 and not {port, port + 1} & ports
    assert rt[1:3] == ["-m", "serving.router"] and rt[rt.index("--worker-urls") + 1:][:2] == urls
    launcher = subprocess.run(rt + ["--print-command"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    cmd = launcher.stdout.split()
    assert cmd[1:3] == ["-m", "sglang_router.launch_router"] and cmd[cmd.index("--worker-urls") + 1:][:2] == urls
    assert cmd[cmd.index("--prometheus-port") + 1] == str(port + 1) and cmd[cmd.index("--policy") + 1] == "cache_aware"
    off = _cmds(_plan("rl_stage1.sh", 2, ROUTER="0", RL_ARGS="--deterministic-rollouts").stdout)
    assert "batch node: router" not in off and "--sglang-router" not in off["every node: trainer"]
    # reproducible rollouts asked for: every server runs SGLang's deterministic inference (seeds honoured)
    assert all("--enable-deterministic-inference" in off[f"node {h}: rollout server"] for h in ("gpu1", "gpu2"))
    assert "--deterministic-rollouts" in off["every node: trainer"]


def test_rl_plan_one_node_is_refused_before_anything_starts():
    """4 trainer GPUs cannot hold EP8: refused (exit 2, the reason) before the conversion or any server."""
    r = _plan("rl_stage1.sh", 1)
    assert r.returncode == 2 and "4 GPUs do not divide into TP4 x PP1 x CP1 and EP8" in r.stderr, r.stderr[-2000:]
    assert "rollout server" not in r.stdout and "start checkpoint" not in r.stdout


def test_with_gpus_slices_the_nodes_own_binding():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="3,4,5,6,7,9,10,11")  # what Slurm bound (not 0..7)
    r = subprocess.run(["bash", "slurm/with_gpus.sh", "4", "4", "bash", "-c", "echo $CUDA_VISIBLE_DEVICES"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "7,9,10,11"
    bad = subprocess.run(["bash", "slurm/with_gpus.sh", "6", "4", "true"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "this node has 8" in bad.stderr


def test_pipeline_ling_lite_keeps_the_scripts_gpu_resources():
    r = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**{k: v for k, v in os.environ.items() if k != "NPROC"}, "DRY_RUN": "1",
                            "SIZE": "ling_lite", "PY": PY, "BASE": "/c/mcore", "TOKENIZER": "/c/hf", "DATA": "/d"})
    lines = {re.search(r"--job-name=(\w+)", ln).group(1): ln for ln in r.stderr.splitlines() if " sbatch " in ln}
    for stage in ("sft", "rl_stage1", "rl_stage2"):
        assert "NPROC=" not in lines[stage] and "--gpus-per-node=0" not in lines[stage], lines[stage]
        assert "runs/ling_lite/" in lines[stage]
    tiny = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1"})
    assert all("--oversubscribe" in ln and "--gpus-per-node=0" in ln for ln in tiny.stderr.splitlines() if " sbatch " in ln)
    via = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DRY_RUN": "1", "SUBMITIT": "1", "PY": PY})
    subs = [shlex.split(ln) for ln in via.stderr.splitlines() if " submit " in ln]
    assert [c[4] for c in subs] == [ln.split()[-1] for ln in tiny.stderr.splitlines() if " sbatch " in ln]  # scripts
    assert all(c[c.index("--sbatch") + 1:][:5] == ["nodes=1", "gpus-per-node=0", "cpus-per-task=2", "mem=16G",
                                                   "oversubscribe"] for c in subs)
    assert [c[c.index("--after") + 1] for c in subs[1:]] == [f"DRY_{n}" for n in ("data", "sft", "select", "rl_stage1",
                                                                                  "difficulty", "rl_stage2", "export",
                                                                                  "eval_sft")]
    for script in ("sft_distill.sh", "rl_stage1.sh", "rl_stage2.sh", "eval.sh", "serve.sh"):
        head = (ROOT / "slurm" / script).read_text()
        assert "#SBATCH --exclusive\n" in head and "#SBATCH --mem=0\n" in head, script


def test_a_submitit_job_runs_its_stage_once_in_a_step_that_sees_the_gpus_and_requeues_on_every_timeout(monkeypatch):
    """submitit calls the job's function in every task (nodes x tasks per node): the stage script, which starts its
    own srun steps over every node, runs in task 0 only. The job's own step is only `--overlap` (a
    `--gpus-per-node=0` step cannot open a GPU under cgroup ConstrainDevices, and from Slurm 23.11 its 0 reaches the
    nested steps), and a time-out always requeues (submitit gives up after 3 by default)."""
    import tempfile

    from megatron_ring import launch

    ex = launch.executor("sft", folder=tempfile.mkdtemp(), cluster="slurm")
    assert ex._executor.parameters["srun_args"] == ["--overlap"] and ex._executor.parameters["nodes"] == 2
    assert ex._executor.max_num_timeout >= 10**6
    monkeypatch.setenv("SLURM_PROCID", "1")  # (task 1 of the job: returns at once, runs nothing)
    assert launch.StageJob("sft", {"PRINT_PLAN": "1", "PY": "/nonexistent/python"})() == \
        {"stage": "sft", "returncode": 0, "task": 1, "ran": False}


def test_the_scripts_refuse_a_slurm_older_than_22_05(tmp_path):
    """`srun --overlap` shares GPUs (and memory) between steps only from Slurm 22.05 on: on 21.08 the trainer's
    step would wait for the rollout servers' GPUs for ever. A job on an older Slurm stops at once, saying so."""
    def check(version: str) -> subprocess.CompletedProcess:
        fake = tmp_path / version
        fake.mkdir()
        (fake / "srun").write_text(f"#!/bin/sh\necho 'slurm-wlm {version}'\n")
        (fake / "srun").chmod(0o755)
        return subprocess.run(["bash", "-c", "source slurm/launch.sh; slurm_supported; echo supported"], cwd=ROOT,
                              env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "PY": PY},
                              capture_output=True, text=True, timeout=60)

    old = check("21.08.5")
    assert old.returncode == 2 and "Slurm 21.08.5 is older than 22.05" in old.stderr, old
    for v in ("22.05.8", "23.11.1", "24.05.0"):
        assert check(v).stdout.strip() == "supported", v
