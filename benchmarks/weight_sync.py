"""Weight sync trainer -> rollout server, side by side: the disk path the trainer used before (90bedf4: dist
checkpoint -> one-process conversion to an HF folder -> read back on rank 0 -> written again -> the server reads
it), the disk transport as it is now (every rank writes the tensors it holds, in the weights' dtype, in parallel;
the server reads the folder) and the in-memory bucketed broadcast transport (rl/weights.py + rl/transport.py) two
ways: rank 0 gathers every bucket and sends it, or (now) every rank holding weights sends its own on a group of its
own with the server — the experts from where they live.

    .venv/bin/python benchmarks/weight_sync.py [--models tiny,ling2] [--bucket-mb 1024] [--repeat 3]

Both at EP2 on 2 trainer ranks (gloo) — the layout class the ling_lite recipes always use (EP8), where the old
path went through disk — into one receiving server (serving/native.py's SGLang API with a weight sink in place of
the model: every way stops once the server holds the bytes, before any model load; its receive buffers are reused
as the GPU caching allocator reuses SGLang's). Models: the tiny recipe, and
``ling2``: Ling-lite at full width with 2 layers (hidden 2048, 64 experts x 1408, 2 shared, vocab 126,464;
1.68B parameters, bf16). Each way syncs 1 + ``--repeat`` times in one run: the first (it also sets the group up) is
reported apart, the sync figures are the median of the others."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BEFORE = "90bedf4"  # the last commit with the disk path (megatron_ring/rl/sync.py)
LING2 = {"hidden_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4,
         "head_dim": 128, "num_experts": 64, "num_experts_per_tok": 6, "moe_intermediate_size": 1408,
         "num_shared_experts": 2, "intermediate_size": 5632, "vocab_size": 126464, "max_position_embeddings": 16384}


# --- the receiving server: SGLang's native API, a byte counter in place of the model ----------------------------
def receiver(port_file: str) -> None:
    import socket

    import torch
    import uvicorn

    from serving import native

    class Sink(native.Server):
        def __init__(self):
            import threading

            self.model_path, self.version, self.context, self.groups = "", "default", 1 << 20, {}
            self.lock, self.weight_ops, self.bytes, self.free = threading.Lock(), threading.Lock(), 0, {}
            self.served = 0

        def _empty(self, shape, dtype):  # receive buffers reused, as the GPU caching allocator gives SGLang's
            free = self.free.get((tuple(shape), dtype))  # torch.empty (fresh pages cost ~half the receive on a CPU)
            return free.pop() if free else torch.empty(shape, dtype=dtype)

        def _load(self, named, version):
            self.bytes += sum(t.nbytes for _, t in named)
            self.version = version or self.version
            for _, t in named:
                self.free.setdefault((tuple(t.shape), t.dtype), []).append(t)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    Path(port_file).write_text(str(sock.getsockname()[1]))
    uvicorn.Server(uvicorn.Config(native.create_app(Sink()), log_level="warning")).run(sockets=[sock])


# --- one trainer rank (under torchrun) ------------------------------------------------------------------------
def _model(name: str):
    import torch

    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.convert.run import _materialize
    from megatron_ring.model.build import build_model
    from megatron_ring.parallel.dist import init_distributed

    base = load_recipe("tiny").hf_config
    cfg = dict(base, **LING2) if name == "ling2" else dict(base)
    recipe = load_recipe("tiny", {"hf_config": cfg, "precision": {"bf16": True, "transformer_impl": "local"},
                                  "parallel": {"expert_model_parallel_size": 2}})
    init_distributed(recipe.parallel, seed=1)
    with torch.device("meta"):
        model = build_model(recipe)
    g = torch.Generator().manual_seed(0)
    for n, p in list(model.named_parameters()):  # (values do not matter; uninitialised memory would be slow to
        _materialize(model, n, (torch.rand(p.shape, generator=g) - 0.5).to(torch.bfloat16))  # compress, not copy)
    return model, cfg


def _before_module():
    import types

    src = subprocess.run(["git", "show", f"{BEFORE}:megatron_ring/rl/sync.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    mod = types.ModuleType("megatron_ring.rl._sync_before")
    mod.__package__ = "megatron_ring.rl"
    exec(compile(src, "sync.py@" + BEFORE, "exec"), mod.__dict__)
    return mod


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def worker(a) -> None:
    import torch.distributed as dist

    from megatron_ring.rl import transport as T
    from megatron_ring.rl.weights import stream_hf_weights

    model, cfg = _model(a.model)
    rank0 = dist.get_rank() == 0
    url = f"http://127.0.0.1:{a.receiver_port}"
    runs, tr = [], None
    if a.way == "memory":  # every rank sends the weights it holds, each on its own group with the server
        tr = T.BroadcastTransport([url] if rank0 else None, [1] if rank0 else None, "127.0.0.1",
                                  a.group_port + dist.get_rank(), group=dist.group.WORLD)
    elif a.way == "memory-rank0":  # rank 0 gathers and sends everything (the broadcast transport before)
        tr = T.BroadcastTransport([url], [1], "127.0.0.1", a.group_port) if rank0 else None
    elif a.way == "disk-now":  # the disk fallback as it is now: every rank writes what it holds (bf16), in parallel
        tr = T.DiskTransport([url] if rank0 else [], Path(a.scratch) / "sync_now", cfg)
    old = _before_module() if a.way == "disk" else None
    scratch = Path(a.scratch)
    for version in range(1, 2 + a.repeat):
        dist.barrier()
        t0 = time.perf_counter()
        if a.way in ("memory", "memory-rank0", "disk-now"):
            if tr:
                tr.begin(version)
            fig = stream_hf_weights(model, cfg, tr.bucket if tr else None, bucket_bytes=a.bucket_mb << 20,
                                    spread=getattr(tr, "spread", False), turns=getattr(tr, "turns", None))
            if tr:
                tr.end()
            import torch

            got = torch.tensor([float(fig["bytes_received"])])
            dist.all_reduce(got)  # pieces to the assemblers, then the broadcast (or a write + the server's read)
            moved = int(got.item()) + fig["bytes_total"] * (2 if a.way == "disk-now" else 1)
        else:
            state = old.gather_hf_state(model, cfg, scratch)
            moved = 0
            if rank0:
                from megatron_ring.convert.hf_io import write_hf_checkpoint

                path = scratch / "sync" / f"v{version:06d}"
                write_hf_checkpoint(state, cfg, path, None)
                T.post(url + "/update_weights_from_disk", {"model_path": str(path)}, 3600)
                ckpt, hf = _du(scratch / "weight_sync"), _du(scratch / "weight_sync_hf")
                moved = 2 * ckpt + 2 * hf + 2 * _du(path)  # each folder written once and read once
        dist.barrier()
        runs.append({"seconds": time.perf_counter() - t0, "bytes": moved,
                     **({"transport_seconds": fig["sink_seconds"]} if a.way.startswith("memory") else {})})
    if rank0:
        n = sum(p.numel() for p in model.parameters())  # (rank 0's share; the total comes from the config)
        Path(a.out).write_text(json.dumps({"runs": runs, "rank0_params": n}))


def _params(cfg: dict) -> int:
    from megatron_ring.convert.mapping import expected_hf_shapes

    import math

    return sum(math.prod(s) for s in expected_hf_shapes(cfg).values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,ling2")
    ap.add_argument("--bucket-mb", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3, help="syncs measured after the first (the median is shown)")
    ap.add_argument("--ways", default="disk,disk-now,memory-rank0,memory", help="which ways to run (the speed-up "
                    "column needs disk)")
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for f in ("model", "way", "out", "scratch"):
        ap.add_argument(f"--{f}", help=argparse.SUPPRESS)
    for f in ("receiver_port", "group_port"):
        ap.add_argument(f"--{f.replace('_', '-')}", dest=f, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.receiver:
        return receiver(a.receiver) or 0
    if a.worker:
        return worker(a) or 0
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.rl.sglang_engine import _free_port
    from serving.health import wait_healthy

    rows = []
    # glibc keeps freed blocks up to 32 MB for reuse instead of returning them to the kernel: a CPU's stand-in for
    # the GPU caching allocator (fresh pages for every bucket halved gloo's rate here); both ways run with it
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(16 << 30))
    for model in a.models.split(","):
        cfg = dict(load_recipe("tiny").hf_config, **(LING2 if model == "ling2" else {}))
        res = {}
        for way in a.ways.split(","):
            with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").exists() else None) as td:
                pf = Path(td) / "port"
                rec = subprocess.Popen([sys.executable, __file__, "--receiver", str(pf)], cwd=ROOT, env=env,
                                       stdout=subprocess.DEVNULL, stderr=open(Path(td) / "receiver.log", "w"))
                while not pf.exists():
                    time.sleep(0.1)
                port = int(pf.read_text())
                wait_healthy(f"http://127.0.0.1:{port}", rec, timeout=120, interval=0.2)
                out = Path(td) / "out.json"
                print(f"[weight_sync] {model}: {way} ...", flush=True)
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                                __file__, "--worker", "--model", model, "--way", way, "--out", str(out),
                                "--scratch", td, "--receiver-port", str(port), "--group-port", str(_free_port()),
                                "--bucket-mb", str(a.bucket_mb), "--repeat", str(a.repeat)], cwd=ROOT, env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=open(Path(td) / "log", "w"))
                res[way] = json.loads(out.read_text())["runs"]
                rec.terminate()
                rec.wait(timeout=30)
            os.sync()  # the disk ways' written-back pages flushed here, not on the CPU of the way measured next
        n = _params(cfg)
        base = sorted(res["disk"][1:], key=lambda r: r["seconds"])[len(res["disk"][1:]) // 2] if "disk" in res else None
        for way, label in (("disk", f"disk (before, {BEFORE})"), ("disk-now", "disk transport, parallel writers (now)"),
                           ("memory-rank0", "in-memory broadcast, rank 0 sends all"),
                           ("memory", "in-memory broadcast, every holder sends its own (now)")):
            if way not in res:
                continue
            first, rest = res[way][0], sorted(res[way][1:], key=lambda r: r["seconds"])
            steady = rest[len(rest) // 2]
            rows.append((model, n, label, first["seconds"], steady["seconds"], steady.get("transport_seconds"), steady["bytes"],
                         base and base["seconds"] / steady["seconds"], base and base["bytes"] / max(steady["bytes"], 1)))
    print(f"\nweight sync, trainer EP2 (2 ranks, gloo) -> 1 server; bucket {a.bucket_mb} MB; median of {a.repeat} syncs after the first\n")
    print("| model | parameters | way | first sync s | sync s | of which broadcast s | bytes moved | speed-up | bytes ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, n, label, s1, s, tr, b, r, rb in rows:
        tr = "" if tr is None else f"{tr:.2f}"
        r, rb = ("", "") if r is None else (f"{r:.1f}x", f"{rb:.1f}x")
        print(f"| {m} | {n / 1e9:.2f}B | {label} | {s1:.2f} | {s:.2f} | {tr} | {b / 1e9:.2f} GB | {r} | {rb} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
