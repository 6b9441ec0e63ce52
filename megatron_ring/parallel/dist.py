"""Distributed start-up that reads torchrun and Slurm environments alike.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` (one task per
GPU) we derive the same from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the first host of
SLURM_JOB_NODELIST, and a port derived from the job id (a fixed port collides on shared nodes).
A single process with neither is world size 1 with an in-process store (no port).
"""
from __future__ import annotations

import os
import subprocess
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config.recipe import ParallelConfig
from . import cpu_compat


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def slurm_port(job_id: str | int) -> int:
    """A rendezvous port derived from the Slurm job id (stable across the job's tasks): 10000-14999, disjoint from
    the rollout servers' 15000-19999 and below Linux's ephemeral ports (slurm/launch.sh derives both the same way)."""
    return 10000 + int(job_id) % 5000


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:
        port = int(e["MASTER_PORT"]) if "MASTER_PORT" in e else slurm_port(e.get("SLURM_JOB_ID", 0))
        addr = e.get("MASTER_ADDR") or _first_slurm_host(e.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)),
                       addr, port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(e.get("MASTER_PORT", 0)), "single")  # port 0: an in-process store


def omp_oversubscription(threads: int, cpus: int) -> str | None:
    """On CPU, gloo's worker threads run torch ops too (e.g. the copies of an ``all_gather_object`` over
    32 KiB, which the first checkpoint save does); each such thread then keeps an OpenMP team of
    ``threads``. Once libgomp manages more threads than the process may use CPUs, it stops spinning at
    barriers and sleeps instead: measured on 2 CPUs with 2 intra-op threads, RL rollouts ran 2.2x slower
    from the first checkpoint on (futex wake-ups every op). Keep ``2 x threads <= CPUs``."""
    if threads > 1 and 2 * threads > cpus:
        return (f"{threads} torch intra-op threads on {cpus} CPUs: after the first checkpoint save gloo's "
                f"worker threads hold OpenMP teams too and libgomp throttles every barrier (2x slower "
                f"decoding measured); set OMP_NUM_THREADS <= {max(1, cpus // 2)}")
    return None


def init_distributed(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30, cpu: bool = False) -> DistEnv:
    """Start torch.distributed (nccl on GPU, gloo on CPU), megatron's parallel groups and RNG tracker.
    ``cpu``: stay on the CPU even where a GPU is visible (conversion, whose full model does not fit one)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    env = detect_env()
    if cpu:  # hide the GPUs before torch initialises CUDA (conversions are their own processes and start here)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():
            raise RuntimeError("init_distributed(cpu=True) after CUDA was initialised: run it in a fresh process")
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.enable()
        msg = omp_oversubscription(torch.get_num_threads(), len(os.sched_getaffinity(0)))
        if msg and env.rank == 0 and not cpu:  # (conversions decode nothing: the slowdown does not apply)
            warnings.warn(msg, stacklevel=2)
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        import datetime

        timeout = datetime.timedelta(minutes=timeout_minutes)
        backend = "nccl" if use_cuda else "gloo"
        if env.world_size == 1 and not env.master_port:  # one process: no rendezvous, no port to pick or race for
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
            dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                    init_method=f"tcp://{env.master_addr}:{env.master_port}", timeout=timeout)
    mp = parallel.model_parallel_size()
    if env.world_size % mp:
        raise ValueError(f"world size {env.world_size} is not divisible by TP x PP x CP = {mp} "
                         f"({parallel})")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(**parallel.sizes(), distributed_timeout_minutes=timeout_minutes)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return env


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank's model, micro-batches and collective tensors live: its CUDA device when there is one
    (the default process group is then NCCL, which takes CUDA tensors only), else the CPU (gloo)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a model chunk's parameters (a DDP wrapper or a bare GPTModel)."""
    for p in module.parameters():
        return p.device
    return device()


def to_device(batch, dev: torch.device):
    """A micro-batch (dict / list / tuple of tensors, or objects with tensor fields such as megatron's
    ``PackedSeqParams``) with every tensor on ``dev``; megatron's ``get_batch`` does the same per micro-batch."""
    import dataclasses

    if isinstance(batch, torch.Tensor):
        return batch.to(dev, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, dev) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, dev) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), dev)
                                             for f in dataclasses.fields(batch)
                                             if isinstance(getattr(batch, f.name), torch.Tensor)})
    return batch


def all_reduce_floats(values: list[float], op: str = "sum", group=None) -> list[float]:
    """All-reduce a few Python numbers over ``group``: the tensor is made on ``device()``, since an NCCL
    group refuses CPU tensors ("No backend type associated with device type cpu"). Every scalar
    collective of the trainers goes through here."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return t.tolist()
