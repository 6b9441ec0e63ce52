"""Weight transports: how a bucket of HF-named tensors (``weights.stream_hf_weights``) reaches the rollout engine.

One interface, one class per way (as slime keeps them), for one weight version: ``begin(version)`` →
``bucket(named)`` per bucket → ``end()``. Driven by trainer rank 0, which assembles every bucket — except a transport
with ``spread = True`` (runs on every trainer rank, gets the buckets that rank assembles) or ``replicate = True``
(runs on every trainer rank, gets every bucket).

- ``InProcessTransport``: the CPU engine in this process (``InProcessEngine``) — parameters copied by name.
- ``BroadcastTransport``: rollout servers on other GPUs (or CPU servers): SGLang's ``/init_weights_update_group``
  once per sender, then per bucket ``/update_weights_from_distributed`` (names, dtypes, shapes) while the sender
  broadcasts each tensor in that order (nccl on GPU, gloo on CPU), on a group made as SGLang makes its side.
- ``IPCTransport``: servers colocated on the trainer's GPUs: ``/update_weights_from_tensor`` with CUDA IPC handles,
  one serialized entry per server TP rank, each made by the trainer rank on that TP rank's GPU (SGLang reads
  ``serialized_named_tensors[tp_rank]``), the servers' memory resumed before the update and released again before
  training (``release_memory``). (On a CPU: shared memory, to a CPU server on the same machine.)
- ``DiskTransport``: the explicit fallback: each bucket a safetensors shard in the weights' own dtype (bf16 in
  training), written by the rank that assembled it (the shards' owners, in parallel), then
  ``/update_weights_from_disk``; the previous version's folder is removed.

Request bodies use the field names of SGLang's request classes (``sglang.srt.managers.io_struct``, checked in
tests/test_transport_parts.py against the pinned release's source)."""
from __future__ import annotations

import base64
import datetime
import io
import json
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import torch

from .http import (FLUSH_WAIT_S, EngineError, abandon_sessions, close_sessions, flush_all, open_sessions,  # noqa: F401
                   post, post_all)  # (the servers' requests; EngineError re-exported)


GROUP = "megatron_ring_weights"


class WeightTransport(Protocol):
    def begin(self, version: int) -> None: ...

    def bucket(self, named: list[tuple[str, torch.Tensor]]) -> None: ...

    def end(self) -> None: ...


class InProcessTransport:
    def __init__(self, engine):
        self.engine = engine

    def begin(self, version: int) -> None:
        self.version, self.params, self.seen = version, dict(self.engine.model.named_parameters()), set()

    @torch.no_grad()
    def bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            p = self.params.get(name)
            if p is None or p.shape != t.shape:  # never serve a half-updated model (SGLang skips unknown names)
                raise RuntimeError(f"weight sync: '{name}' {tuple(t.shape)} has no such parameter in the engine")
            p.copy_(t)
            self.seen.add(name)

    def end(self) -> None:
        missing = sorted(set(self.params) - self.seen)
        if missing:
            raise RuntimeError(f"weight sync: {len(missing)} engine parameter(s) not sent, e.g. {missing[:4]}")
        self.engine.version = self.version


# --- SGLang request bodies (field names of sglang.srt.managers.io_struct) -------------------------------------
def init_group_payload(addr: str, port: int, rank_offset: int, world_size: int, backend: str,
                       group: str = GROUP) -> dict:
    return {"master_address": addr, "master_port": port, "rank_offset": rank_offset, "world_size": world_size,
            "group_name": group, "backend": backend}


def distributed_payload(named: list[tuple[str, torch.Tensor]], version: int, group: str = GROUP,
                        flush_cache: bool = False) -> dict:
    return {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named], "group_name": group, "flush_cache": flush_cache,
            "weight_version": str(version)}


def tensor_payload(per_tp_rank: list[str], version: int, flush_cache: bool = False) -> dict:
    return {"serialized_named_tensors": per_tp_rank, "flush_cache": flush_cache, "weight_version": str(version)}


def disk_payload(path: str | Path, version: int) -> dict:
    return {"model_path": str(path), "weight_version": str(version), "flush_cache": True}


def custom_process_group(backend: str, addr: str, port: int, world_size: int, rank: int, group_name: str = GROUP,
                         timeout: float = 1800.0):
    """A process group outside the default one, made as SGLang's ``init_custom_process_group`` makes it (the
    trainer is its rank 0 and hosts the store): tcp rendezvous, ``PrefixStore(group_name)``, torch's helper."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    td = datetime.timedelta(seconds=timeout)
    store, rank, world_size = next(rendezvous(f"tcp://{addr}:{port}", rank, world_size, timeout=td))
    store.set_timeout(td)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=td)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def _in_background(fn, *args) -> Future:
    """``fn(*args)`` on a daemon thread (a request stuck on a dead peer must not keep the process alive)."""
    fut: Future = Future()

    def run():
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 (handed to the waiter)
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return fut


def _wait_unless_refused(done, futs: list[Future], what: str) -> None:
    """Poll until ``done()``; the first of ``futs`` to fail ends the wait at once, as an EngineError naming ``what``
    and carrying the server's message."""
    while not done():
        for f in futs:
            if f.done() and f.exception() is not None:
                raise EngineError(f"{what}: {f.exception()}") from f.exception()
        time.sleep(0.005)
    for f in futs:
        if f.exception() is not None:
            raise EngineError(f"{what}: {f.exception()}") from f.exception()


def _completed(works: list) -> bool:
    """Whether every one of ``works`` is complete; the ones found complete are dropped from the list, so a poll
    asks only the first unfinished one (a bucket has hundreds, and the poller shares the CPU with the send)."""
    while works and works[0].is_completed():
        works.pop(0)
    return not works


class BroadcastTransport:
    """SGLang's broadcast path. Without ``group``: trainer rank 0 sends every bucket (it assembles them all). With
    ``group`` (a gloo group of all trainer ranks; ``spread``): every rank that holds weights sends the buckets it
    assembles — whole experts and PP layers from where they live, nothing gathered on rank 0 — each on a group of
    its own with the servers (made at its first bucket; ``by_stage``: only each pipeline stage's first rank sends,
    gathering its stage's pieces, as slime does: one group per stage on the servers' GPUs), one bucket at
    a time in one order (``turns``: each server serves requests in arrival order, so parallel senders could each
    hold a different server first and wait for each other forever). ``urls``/``tp_sizes``/``api_key``: rank 0's
    (sent to the others over ``group``); ``master_addr``/``master_port``: this rank's own rendezvous."""

    def __init__(self, urls: list[str] | None, tp_sizes: list[int] | None, master_addr: str | None, master_port: int,
                 backend: str | None = None, timeout: float = 1800.0, api_key: str | None = None, group=None,
                 by_stage: bool = False):
        import torch.distributed as dist

        self.ctrl, self.rank, self.spread, self.turns = group, 0, False, None
        if group is not None and dist.get_world_size(group) > 1:
            shared = [(urls, tp_sizes, api_key, timeout)]
            dist.broadcast_object_list(shared, src=dist.get_global_rank(group, 0), group=group)
            urls, tp_sizes, api_key, timeout = shared[0]
            self.rank, self.spread, self.turns = dist.get_rank(group), True, group
        from .sglang_engine import reachable_address

        self.urls, self.tp_sizes, self.port = urls, tp_sizes, master_port
        self.addr = master_addr or reachable_address(urls)  # (servers elsewhere cannot reach our 127.0.0.1)
        self.by_stage = by_stage and self.spread  # one sender per pipeline stage (weights.stream_hf_weights)
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.timeout, self.key, self.group = timeout, api_key, None

    def _init_group(self) -> None:
        """Our side and every server's TP ranks join one group; a server that refuses ends the wait at once
        (our rendezvous would otherwise wait for it until the timeout)."""
        import os

        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.urls))]
        # a name of its own per trainer process: a server keeps the groups of earlier trainers (torch refuses a
        # second group under one name), e.g. servers attached by URL across a restart
        self.name = f"{GROUP}_{os.getpid()}_{int(time.time())}_r{self.rank}"
        what = f"weight-update group ({self.addr}:{self.port}, {world} ranks)"
        asks = [_in_background(post, u + "/init_weights_update_group", init_group_payload(
            self.addr, self.port, off, world, self.backend, self.name), self.timeout, self.key)
            for u, off in zip(self.urls, offsets)]
        ours = _in_background(custom_process_group, self.backend, self.addr, self.port, world, 0, self.name,
                              self.timeout)
        _wait_unless_refused(lambda: ours.done() and all(f.done() for f in asks), asks + [ours], what)
        self.group = ours.result()

    def begin(self, version: int) -> None:
        if self.group is None and not self.spread:
            self._init_group()
        self.version = version
        if self.rank == 0:  # (before stream_hf_weights' collective plan: before any rank's first bucket)
            open_sessions(self.urls, self.timeout, self.key)

    def abandon(self) -> None:
        if self.rank == 0:
            abandon_sessions(self.urls, self.timeout, self.key)

    def bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        import torch.distributed as dist

        if self.group is None:
            self._init_group()
        body = distributed_payload(named, self.version, self.name)
        futs = [_in_background(post, u + "/update_weights_from_distributed", body, self.timeout, self.key)
                for u in self.urls]  # the servers join the broadcasts inside these requests
        works = [dist.broadcast(t, src=0, group=self.group, async_op=True) for _, t in named]
        # a refusal (the server never joins) ends the sync with its message instead of a broadcast hung until the
        # group's timeout; the group is then unusable, and the trainer stops
        pending = list(works)
        _wait_unless_refused(lambda: _completed(pending) and all(f.done() for f in futs), futs,
                             f"weight update v{self.version} ({len(named)} tensors)")
        for w in works:
            w.wait()

    def end(self) -> None:
        import torch.distributed as dist

        if self.spread:
            dist.barrier(group=self.ctrl)  # every sender's buckets are in
        if self.rank == 0:
            close_sessions(self.urls, self.timeout, self.key)


def serialize_for_ipc(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(named, output_str=True)`` without importing SGLang (it has
    its own environment): ForkingPickler with torch's reductions, a CUDA tensor's device named by its UUID as
    SGLang's ``monkey_patch_torch_reductions`` does (the server's device numbering differs), base64."""
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    def reduce_tensor(t):
        fn, args = reductions.reduce_tensor(t)
        if t.is_cuda:  # argument 6 of rebuild_cuda_tensor is the device index
            args = (*args[:6], str(torch.cuda.get_device_properties(args[6]).uuid), *args[7:])
        return fn, args

    buf = io.BytesIO()
    p = ForkingPickler(buf)  # (its own dispatch table: copyreg's + torch's reducers; ours for tensors on top)
    p.dispatch_table[torch.Tensor] = p.dispatch_table[torch.nn.Parameter] = reduce_tensor
    p.dump(named)
    return base64.b64encode(buf.getvalue()).decode()


class IPCTransport:
    """On every trainer rank (``replicate``: each gets every bucket, on its own GPU). Colocated servers: server ``e``
    (TP ``tp``) runs on the GPUs of trainer ranks ``e·tp … e·tp+tp-1``; each of those ranks serializes its own copy
    (CUDA IPC handles of its GPU), the group's first rank gathers them in TP order — SGLang's TP rank ``i`` opens
    ``serialized_named_tensors[i]``, a tensor on its own GPU — and posts them to its server; the group waits until
    the server has copied. Rank 0 (the rollout controller) releases and resumes every server's memory. Without a
    process group (one process), that process serves every server (each TP rank opening the same handles).
    ``urls``/``tp_size`` are rank 0's; the others receive them over ``group`` (gloo, all trainer ranks)."""
    replicate = True

    def __init__(self, urls: list[str] | None, tp_size: int | None, timeout: float = 1800.0,
                 api_key: str | None = None, group=None):
        import torch.distributed as dist

        self.timeout, self.key, self.released, self.group, self.sub = timeout, api_key, False, group, None
        self.rank = 0
        if dist.is_available() and dist.is_initialized():
            shared = [(urls, tp_size)]
            dist.broadcast_object_list(shared, src=dist.get_global_rank(group, 0) if group else 0, group=group)
            urls, tp_size = shared[0]
            world, self.rank = dist.get_world_size(group), dist.get_rank(group)
            if world != len(urls) * tp_size:
                raise ValueError(f"ipc (colocated) weight transport: {world} trainer ranks, {len(urls)} server(s) × "
                                 f"TP {tp_size}: each trainer GPU must hold one server TP rank (or use broadcast)")
            ranks = dist.get_process_group_ranks(group) if group else list(range(world))
            subs = [dist.new_group(ranks[e * tp_size:(e + 1) * tp_size], backend="gloo") for e in range(len(urls))]
            self.sub = subs[self.rank // tp_size]
        self.urls, self.tp = urls, tp_size

    def _all(self, path: str, body: dict) -> None:
        post_all(self.urls, path, body, self.timeout, self.key)

    def release_memory(self) -> None:
        """Before training: the servers give back their weights, KV cache and CUDA graphs (``--enable-memory-saver``;
        ``{}``: SGLang's every tag). SGLang asserts it is idle (a failed assertion kills the server), and requests an
        abort just ended may still be finishing: first a flush that waits for idle (as slime flushes first)."""
        if not self.released:
            flush_all(self.urls, FLUSH_WAIT_S, self.timeout, self.key)
            self._all("/release_memory_occupation", {})
            self.released = True

    def begin(self, version: int) -> None:
        self.version = version
        if self.rank == 0:
            if self.released:  # the weights' memory first (the KV cache after the update: less peak memory)
                self._all("/resume_memory_occupation", {"tags": ["weights"]})
            open_sessions(self.urls, self.timeout, self.key)
        if self.sub is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)  # the sessions are open before any rank's first tensors

    def abandon(self) -> None:
        if self.rank == 0:
            abandon_sessions(self.urls, self.timeout, self.key)

    def bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        import torch.distributed as dist

        if torch.cuda.is_available():
            named = [(n, t.cuda()) for n, t in named]
        else:  # a CPU server on this machine (serving/native.py): shared memory by file name, not fd passing
            from ..parallel.cpu_compat import share_cpu_tensors_by_file

            share_cpu_tensors_by_file()
        if self.sub is None:  # one serialization per server TP rank: each opens (and releases) only its own handles
            blobs = [serialize_for_ipc(named) for _ in range(self.tp)]
            self._all("/update_weights_from_tensor", tensor_payload(blobs, self.version))
            return
        blob = serialize_for_ipc(named)
        first = self.rank % self.tp == 0
        blobs = [None] * self.tp if first else None
        dist.gather_object(blob, blobs, dst=dist.get_global_rank(self.sub, 0), group=self.sub)
        if first:
            post(self.urls[self.rank // self.tp] + "/update_weights_from_tensor",
                 tensor_payload(blobs, self.version), self.timeout, self.key)
        dist.barrier(group=self.sub)  # the server copied the tensors: now they may go
        del named

    def end(self) -> None:
        import torch.distributed as dist

        if self.sub is not None:
            dist.barrier(group=self.group)  # every server updated
        if self.rank == 0:
            post_all(self.urls, "/end_weight_update", {}, self.timeout, self.key)
            if self.released:  # every tag the release took, the weights' aside (slime resumes these two together)
                self._all("/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})
                self.released = False
            flush_all(self.urls, FLUSH_WAIT_S, self.timeout, self.key)


class DiskTransport:
    """On every trainer rank (``spread``: each writes the buckets it assembles — the owners of the shards write in
    parallel — as ``model-r<rank>-<n>.safetensors`` in the weights' own dtype); rank 0 then writes the index and
    config, has the servers load the folder and removes the older versions. ``group``: a gloo group of all trainer
    ranks (the trainer's control group); the folder must be one the servers read (a shared filesystem across nodes)."""
    spread = True

    def __init__(self, urls: list[str], sync_dir: str | Path, hf_config: dict, timeout: float = 3600.0,
                 api_key: str | None = None, group=None):
        self.urls, self.dir, self.cfg, self.timeout, self.key = urls, Path(sync_dir), hf_config, timeout, api_key
        self.group = group

    def _dist(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def begin(self, version: int) -> None:
        import torch.distributed as dist

        self.version, self.path = version, self.dir / f"v{version:06d}"
        self.rank = dist.get_rank(self.group) if self._dist() else 0
        if self.rank == 0:  # (a half-written folder of this version, from an interrupted sync, goes first)
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
        if self._dist():
            dist.barrier(self.group)
        self.files, self.dtype = [], None

    def bucket(self, named: list[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        f = f"model-r{self.rank:03d}-{len(self.files) + 1:05d}.safetensors"
        save_file({n: t.detach().contiguous().cpu() for n, t in named}, str(self.path / f), metadata={"format": "pt"})
        self.files.append((f, [n for n, _ in named], sum(t.nbytes for _, t in named)))
        self.dtype = self.dtype or named[0][1].dtype

    def end(self) -> None:
        import torch.distributed as dist

        from ..convert.hf_io import hf_export_config

        every = [(self.files, self.dtype)]
        if self._dist():
            every = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(every, (self.files, self.dtype), group=self.group)  # (all written by now)
        if self.rank != 0:
            return
        files = [f for fs, _ in every for f in fs]
        dtype = next(d for _, d in every if d is not None)
        weight_map = {n: f for f, names, _ in files for n in names}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(b for _, _, b in files)}, "weight_map": weight_map}))
        (self.path / "config.json").write_text(json.dumps(hf_export_config(self.cfg, dtype), indent=2))
        if self.urls:
            post_all(self.urls, "/update_weights_from_disk", disk_payload(self.path, self.version), self.timeout,
                     self.key)
        for old in self.dir.glob("v*"):  # the servers now read this version: older ones are garbage
            if old != self.path and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
