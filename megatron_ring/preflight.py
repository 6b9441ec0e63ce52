"""``megatron-ring preflight`` (every rank, under the launcher's torchrun: ``sbatch slurm/preflight.sh``): before a
long run, what the first minutes of a real one would find out the hard way, on the nodes it gets.

- **GPUs in every step**: each rank opens the node's GPU device files (``MEGATRON_RING_GPU_DEVICES``, default
  ``/dev/nvidia[0-9]*``). Under Slurm's cgroup ``ConstrainDevices`` a GPU the step was not given fails with EPERM;
  a given one opens (or fails with ENXIO where no driver answers, as on the local cluster's fake GPUs). A rank whose
  step holds fewer usable GPUs than Slurm bound to the node is a problem (a step created with ``--gpus-per-node=0``).
- **The weight-sync address**: rank 0's (``rl.sglang_engine.sync_rendezvous``: its own host, the job's sync port,
  where the rollout servers connect to join the weight-update group). Rank 0 listens there; every rank connects to it
  from its node. c10d puts rank 0 on the node whose name sorts first, which need not be the allocation's first host.
- **One launch per node**: every (host, local rank) once, ``nodes x ranks per node`` in all.

Rank 0 prints one table and a JSON line (``--out``: the same JSON in a file); exit 1 on any problem.
``--hold S`` then stays up S seconds (a drill: cancel or preempt the job meanwhile), ending early on USR1/USR2/TERM.
"""
from __future__ import annotations

import argparse
import errno
import glob
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta


def gpu_devices(pattern: str) -> dict[str, str]:
    """Each GPU device file: "usable" (it opens, or no driver answers: ENXIO/ENODEV), "denied" (EPERM/EACCES: the
    step's device cgroup refuses it), or the errno's name."""
    out = {}
    for path in sorted(glob.glob(pattern)):
        try:
            os.close(os.open(path, os.O_RDONLY))
            out[path] = "usable"
        except OSError as e:
            out[path] = ("usable" if e.errno in (errno.ENXIO, errno.ENODEV) else
                         "denied" if e.errno in (errno.EPERM, errno.EACCES) else errno.errorcode.get(e.errno, "?"))
    return out


def bound_gpus() -> int:
    """The GPUs Slurm bound to this node for the job (GRES), else those CUDA_VISIBLE_DEVICES names, else 0."""
    if os.environ.get("SLURM_GPUS_ON_NODE"):
        return int(os.environ["SLURM_GPUS_ON_NODE"])
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in cvd.split(",") if d]) if cvd else 0


def gpus_here() -> dict:
    """This process's GPUs: how many Slurm bound to the node, how many its step can open, the names it is refused."""
    devs = gpu_devices(os.environ.get("MEGATRON_RING_GPU_DEVICES", "/dev/nvidia[0-9]*"))
    return {"bound_gpus": bound_gpus(), "usable_gpus": sum(v == "usable" for v in devs.values()),
            "denied": [os.path.basename(p) for p, v in devs.items() if v == "denied"]}


def check_here() -> int:
    """``--here``: the launching step alone (one JSON line); 1 when it cannot open the GPUs bound to the node."""
    me = {"launcher_step": socket.gethostname(), **gpus_here()}
    print(json.dumps(me), flush=True)
    if me["usable_gpus"] < me["bound_gpus"]:
        print(f"preflight: the launching step on {me['launcher_step']} can open {me['usable_gpus']} of the "
              f"{me['bound_gpus']} GPU(s) bound to the node (a step created without them?)", file=sys.stderr)
        return 1
    return 0


def reach(addr: str, port: int, timeout_s: float) -> bool:
    try:
        socket.create_connection((addr, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def problems(reports: list[dict], sync: tuple[str, int] | None, nodes: int | None) -> list[str]:
    out = []
    for r in reports:
        if r["usable_gpus"] < r["bound_gpus"]:
            out.append(f"rank {r['rank']} on {r['host']}: {r['bound_gpus']} GPU(s) bound to the node, its step can "
                       f"open {r['usable_gpus']} (denied: {', '.join(r['denied']) or 'none'})")
        if sync is not None and not r["sync_reached"]:
            out.append(f"rank {r['rank']} on {r['host']}: cannot reach the weight-sync address {sync[0]}:{sync[1]}")
    if sync is not None and sync[0] != reports[0]["host"]:
        out.append(f"the weight-sync address names {sync[0]} but rank 0 runs on {reports[0]['host']}")
    seen = [(r["host"], r["local_rank"]) for r in reports]
    if len(set(seen)) < len(seen):
        out.append(f"a (host, local rank) pair appears twice: {sorted(seen)}")
    hosts = {r["host"] for r in reports}
    if nodes is not None and len(hosts) != nodes:
        out.append(f"{len(hosts)} host(s) ran ranks, the job has {nodes} node(s)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-ring preflight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="rank 0 writes the report (JSON) here")
    ap.add_argument("--hold", type=float, default=0.0, help="then stay up this many seconds (a cancel/preempt drill)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to reach the weight-sync address")
    ap.add_argument("--here", action="store_true", help="only this process (the launching step: where the stage "
                    "scripts check CUDA): its GPUs, one JSON line; exit 1 when it cannot open those bound to the node")
    a = ap.parse_args(argv)
    if a.here:
        return check_here()
    import torch
    import torch.distributed as dist

    from .rl.sglang_engine import sync_rendezvous

    dist.init_process_group("gloo", timeout=timedelta(seconds=max(120.0, 2 * a.timeout)))
    rank, world = dist.get_rank(), dist.get_world_size()
    host = socket.gethostname()
    addr, port = sync_rendezvous(rank) if rank == 0 else (None, None)
    sync = [(addr, port) if addr else None]  # rank 0's, for every rank
    dist.broadcast_object_list(sync, src=0)
    sync_at = sync[0]
    listener = None
    if rank == 0 and sync_at is not None:  # rank 0 listens where the servers will connect
        listener = socket.create_server(("", sync_at[1]), reuse_port=False)
    dist.barrier()
    mine = {"rank": rank, "host": host, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "slurm_node": os.environ.get("SLURMD_NODENAME"), **gpus_here(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "sync_reached": reach(*sync_at, a.timeout) if sync_at else None}
    reports: list = [None] * world
    dist.all_gather_object(reports, mine)
    dist.barrier()
    if listener is not None:
        listener.close()
    nodes = int(os.environ["SLURM_JOB_NUM_NODES"]) if os.environ.get("SLURM_JOB_NUM_NODES") else None
    bad = problems(reports, sync_at, nodes)
    if rank == 0:
        print(f"{'rank':>4}  {'host':<12} {'local':>5}  {'GPUs bound/usable':>17}  {'CUDA':>4}  sync")
        for r in reports:
            reached = "-" if r["sync_reached"] is None else "ok" if r["sync_reached"] else "NO"
            print(f"{r['rank']:>4}  {r['host']:<12} {r['local_rank']:>5}  {r['bound_gpus']:>8}/{r['usable_gpus']:<8}  "
                  f"{r['cuda_devices']:>4}  {reached}")
        report = {"preflight": reports, "sync_address": list(sync_at) if sync_at else None, "world": world,
                  "problems": bad, "ok": not bad}
        print(json.dumps(report), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f)
        for p in bad:
            print(f"preflight: {p}", file=sys.stderr)
    if a.hold > 0:
        stop = []
        for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(s, lambda n, f: stop.append(n))
        t0 = time.time()
        while time.time() - t0 < a.hold and not stop:
            time.sleep(0.2)
        if rank == 0:
            print(json.dumps({"preflight_hold_ended": "signal " + signal.Signals(stop[0]).name if stop else "time"}),
                  flush=True)
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
