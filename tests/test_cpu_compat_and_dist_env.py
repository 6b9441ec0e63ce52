"""The CPU dev mode patches only without CUDA; distributed start-up reads torchrun and Slurm alike."""
import subprocess
import sys

from megatron_ring.parallel.dist import detect_env, slurm_port

from .conftest import ROOT


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_nothing_is_patched_when_cuda_is_present():
    out = _run(
        "import torch; torch.cuda.is_available = lambda: True\n"
        "orig = (torch.zeros, torch.Tensor.type, torch.cuda.current_device)\n"
        "from megatron_ring.parallel import cpu_compat\n"
        "active = cpu_compat.enable()\n"
        "print(active, cpu_compat.PATCHES, (torch.zeros, torch.Tensor.type, torch.cuda.current_device) == orig)")
    assert out == "False [] True"


def test_cpu_mode_patches_each_cuda_assumption():
    out = _run(
        "import torch\n"
        "from megatron_ring.parallel import cpu_compat\n"
        "assert cpu_compat.enable() and cpu_compat.enable()  # idempotent\n"
        "t = torch.zeros(2, device='cuda'); o = torch.ones(1, device=torch.device('cuda', 0))\n"
        "print(len(cpu_compat.PATCHES), t.device.type, o.device.type, t.type(), t.to(torch.float16).dtype,"
        " torch.cuda.current_device(), t.cuda() is t)")
    n, dev, dev2, tstr, half, cur, same = out.split()
    assert int(n) == 8 and dev == dev2 == "cpu" and tstr == "torch.cuda.FloatTensor"
    assert half == "torch.float16" and cur == "cpu" and same == "True"


def test_detect_env_torchrun():
    e = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (3, 8, 1, "n1", 1234, "torchrun")


def test_detect_env_slurm_srun_port_from_job_id():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-a", "MASTER_ADDR": "gpu-a"}
    e = detect_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 5, "gpu-a", "slurm")
    assert e.master_port == slurm_port(4242) == 10000 + 4242 and slurm_port(4243) != e.master_port
    # rendezvous ports never fall in the rollout servers' range (slurm/launch.sh: 15000 + id % 5000)
    assert all(10000 <= slurm_port(j) < 15000 for j in (0, 4999, 5000, 9999, 25000, 123456789))
    launch = (ROOT / "slurm" / "launch.sh").read_text()
    assert "rdzv_port() { echo $((10000 + ${SLURM_JOB_ID:-0} % 5000)); }" in launch
    assert "server_port() { echo $((15000 + ${SLURM_JOB_ID:-0} % 5000)); }" in launch


def test_detect_env_single_process():
    e = detect_env({})
    assert (e.rank, e.world_size, e.launcher, e.master_port) == (0, 1, "single", 0)  # an in-process store


def test_omp_oversubscription_warning_threshold():
    """2 x intra-op threads > CPUs is where libgomp starts throttling once gloo threads hold teams."""
    from megatron_ring.parallel.dist import omp_oversubscription

    assert omp_oversubscription(1, 2) is None  # the launcher's default on this machine
    assert omp_oversubscription(2, 4) is None
    assert omp_oversubscription(8, 16) is None
    msg = omp_oversubscription(2, 2)
    assert msg and "OMP_NUM_THREADS <= 1" in msg
    assert "OMP_NUM_THREADS <= 8" in omp_oversubscription(16, 16)
