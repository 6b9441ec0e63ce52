"""The policy's weights as HF-named tensors, gathered in memory from any TP/EP/PP layout, in buckets.

The layout comes from megatron-core itself: ``model.sharded_state_dict()`` says, for every local tensor, which
global tensor it is a piece of, where it sits (``global_offset``) and whether this rank holds the main replica —
the same description a dist checkpoint is written from, so the result equals ``megatron-ring export`` bit for bit
(tests/mp/case_weight_sync.py). A piece's *unit* is one full tensor of the TP1/EP1/PP1 model: megatron stacks
layers (and experts) as leading axes of one checkpoint key; a unit is one layer's (one expert's) slice.

``stream_hf_weights`` (collective) plans once from metadata only — every unit tiled exactly by its pieces, the HF
names and shapes the config implies — before any data moves; then, bucket by bucket (units in HF file order, at most
``bucket_bytes`` or one unit), the ranks that own pieces send them to the bucket's assembler — rank 0 (the
in-process transport, a broadcast from rank 0 alone), or with ``spread`` a rank holding the units
(``spread_buckets``: the disk and broadcast transports, whose ranks write / send in parallel what they own) — which
assembles the units (one it holds whole is lent as it is), renames them to HF (QKV regrouped, SwiGLU split) and hands
the bucket to ``sink`` (a weight transport), then drops it. The full model never sits on one rank: an assembler's
extra memory is one bucket plus one tensor (measured)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ..convert.mapping import (ConversionError, _canonical, mcore_names, mcore_tensor_to_hf, verify_hf_shapes)

_EXPERTS = "mlp.experts.experts."  # megatron's checkpoint key for experts (SequentialMLP and TEGroupedMLP alike)


@dataclass
class Unit:
    name: str  # canonical full megatron name (mapping.mcore_names)
    shape: tuple[int, ...]
    dtype: str
    pieces: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (rank, offset, shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


def unit_name(key: str, prepend: tuple[int, ...]) -> str:
    """A checkpoint key plus its stacked-axis offsets -> the TP1/EP1/PP1 parameter name (canonical local spec)."""
    if prepend:
        if not key.startswith("decoder.layers."):
            raise ConversionError(f"checkpoint key '{key}' has stacked axes {prepend} outside decoder.layers")
        rest = key[len("decoder.layers."):]
        if len(prepend) == 2:
            if not rest.startswith(_EXPERTS):
                raise ConversionError(f"checkpoint key '{key}' has two stacked axes but is not an expert tensor")
            rest = f"mlp.experts.local_experts.{prepend[1]}." + rest[len(_EXPERTS):]
        elif len(prepend) > 2:
            raise ConversionError(f"checkpoint key '{key}' has {len(prepend)} stacked axes (at most 2 known)")
        key = f"decoder.layers.{prepend[0]}.{rest}"
    return _canonical(key)


def local_pieces(model: torch.nn.Module) -> dict[tuple[str, tuple[int, ...]], tuple[torch.Tensor, tuple[int, ...]]]:
    """This rank's main-replica pieces: (unit name, offset in the unit) -> (tensor, unit shape)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}

    def visit(v):
        if isinstance(v, ShardedTensorFactory):
            built = v.build()
            for x in built.values() if isinstance(built, dict) else built if isinstance(built, list) else [built]:
                visit(x)
        elif isinstance(v, ShardedTensor):
            rid = v.replica_id if isinstance(v.replica_id, tuple) else (v.replica_id,)
            if any(rid):
                return  # another rank holds the main replica (TP-duplicated norms, DP copies)
            if v.flattened_range is not None:
                raise ConversionError(f"'{v.key}': a flattened (optimizer-state) shard is not a model weight")
            n = v.prepend_axis_num
            name = unit_name(v.key, tuple(v.global_offset[:n]))
            out[(name, tuple(v.global_offset[n:]))] = (v.data.detach(), tuple(v.global_shape[n:]))
        # ShardedObject: TE's FP8 metadata (_extra_state), not a weight

    for v in model.sharded_state_dict().values():
        visit(v)
    return out


def plan(model: torch.nn.Module, cfg: dict, group=None):
    """Collective. (units in HF file order, this rank's pieces); refuses a layout that does not tile the model or
    HF names/shapes the config does not imply — before any data moves."""
    mine = local_pieces(model)
    meta = [(name, off, tuple(t.shape), str(t.dtype).removeprefix("torch."), ushape)
            for (name, off), (t, ushape) in mine.items()]
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, meta, group=group)
    units: dict[str, Unit] = {}
    for rank, rows in enumerate(every):
        for name, off, shape, dtype, ushape in rows:
            u = units.setdefault(name, Unit(name, ushape, dtype))
            if u.shape != ushape or u.dtype != dtype:
                raise ConversionError(f"'{name}': ranks disagree on its shape/dtype ({u.shape} {u.dtype} vs "
                                      f"{ushape} {dtype} on rank {rank})")
            u.pieces.append((rank, off, shape))
    want = mcore_names(cfg)
    missing, extra = sorted(set(want) - set(units)), sorted(set(units) - set(want))
    if missing or extra:
        raise ConversionError(f"the model's layout does not match its config: missing {missing[:5]}, "
                              f"not in the config {extra[:5]}")
    for u in units.values():
        covered = sum(math.prod(s) for _, _, s in u.pieces)
        inside = all(o + s <= n for _, off, shp in u.pieces for o, s, n in zip(off, shp, u.shape))
        if covered != math.prod(u.shape) or not inside:
            raise ConversionError(f"'{u.name}': its pieces do not tile {u.shape}: {u.pieces[:4]}")
    shapes = {}
    for name in want:
        u = units[name]
        for hf, t in mcore_tensor_to_hf(name, torch.empty(u.shape, device="meta"), cfg):
            shapes[hf] = tuple(t.shape)
    verify_hf_shapes(shapes, cfg)
    return [units[n] for n in want], {k: t for k, (t, _) in mine.items()}


def buckets(units: list[Unit], bucket_bytes: int) -> list[list[Unit]]:
    """Consecutive units up to ``bucket_bytes`` (a larger unit travels alone)."""
    out, cur, size = [], [], 0
    for u in units:
        if cur and size + u.nbytes > bucket_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append(u)
        size += u.nbytes
    return out + [cur] if cur else out


def spread_buckets(units: list[Unit], bucket_bytes: int, world: int,
                   sender_of: list[int] | None = None) -> list[tuple[list[Unit], int]]:
    """(bucket, assembler) for writers on every rank: each unit to a rank holding a piece of it (a whole expert or
    a PP stage's layer: its owner, nothing travels; a TP-split one: the least loaded of its holders) — or, with
    ``sender_of`` (rank -> the rank that sends for it: its pipeline stage's first), to the sender of such a rank —
    then each rank's units in buckets as ``buckets`` makes them, the ranks' buckets interleaved (no rank waits on
    another's run of buckets)."""
    load, mine = [0] * world, [[] for _ in range(world)]
    via = sender_of or list(range(world))
    for u in units:
        r = min({via[r] for r, _, _ in u.pieces}, key=lambda r: (load[r], r))
        load[r] += u.nbytes
        mine[r].append(u)
    per = [buckets(m, bucket_bytes) for m in mine]
    return [(b[i], r) for i in range(max(map(len, per))) for r, b in enumerate(per) if i < len(b)]


def stream_hf_weights(model: torch.nn.Module, cfg: dict, sink: Callable[[list[tuple[str, torch.Tensor]]], None] | None,
                      bucket_bytes: int = 1 << 30, group=None, device: torch.device | str | None = None,
                      spread: bool = False, replicate: bool = False, turns=None, by_stage: bool = False) -> dict:
    """Collective. Every bucket of HF-named full tensors goes to ``sink`` on its assembler (rank 0 unless ``spread``;
    ``sink`` is ignored elsewhere), or with ``replicate`` on every rank (the assembler broadcasts it). ``device``:
    where buckets are assembled (default: where the weights live). ``turns`` (a group of all ranks): a barrier before
    every bucket's sink, so the sinks take their turns in one order (the next bucket is assembled meanwhile) —
    senders to several servers need it (each server serves requests in arrival order and a broadcast waits for every
    server: two senders first at different servers would wait for each other forever). ``by_stage`` (with ``spread``):
    only each pipeline stage's first rank assembles (``stage_senders``). Returns this rank's figures. The parameter
    all-gathers a DDP left for the next forward are finished first (``training.core.gathered_params``)."""
    from ..training.core import gathered_params

    t0 = time.perf_counter()
    gathered_params(model)
    units, mine = plan(model, cfg, group)
    me = dist.get_rank(group)
    g = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    dev = device or (next(iter(mine.values())).device if mine else "cpu")
    moved = sent = assembled = 0
    plan_s, sink_s = time.perf_counter() - t0, 0.0
    world = dist.get_world_size(group)
    parts = spread_buckets(units, bucket_bytes, world, stage_senders(group) if by_stage else None) if spread else \
        [(b, 0) for b in buckets(units, bucket_bytes)]
    for bucket, dest in parts:
        full = None
        if me == dest:
            full = _assemble(bucket, mine, dev, g, group, me, copy=replicate)
            assembled += 1
            moved += sum(math.prod(shp) * getattr(torch, u.dtype).itemsize
                         for u in bucket for r, _, shp in u.pieces if r != me)
        else:
            works, keep = [], []  # (keep: a copy made by .contiguous() must outlive its send)
            for u in bucket:
                for rank, off, _ in u.pieces:
                    if rank == me:
                        t = mine[(u.name, off)].contiguous()
                        works.append(dist.isend(t, dst=g(dest), group=group))
                        keep.append(t)
                        sent += t.nbytes
            for w in works:
                w.wait()
            del keep
            if replicate:
                full = [(u.name, torch.empty(u.shape, dtype=getattr(torch, u.dtype), device=dev)) for u in bucket]
        if replicate:  # every rank its own copy of the bucket (the IPC transport: one per server TP rank's GPU)
            for _, t in full:
                dist.broadcast(t, src=g(dest), group=group)
        named = []
        while full:
            name, t = full.pop(0)
            named += mcore_tensor_to_hf(name, t, cfg)
            del t
        if turns is not None:  # (assembled while the bucket before travels; sent once it is in, on every rank)
            dist.barrier(group=turns)
        if sink is not None and (me == dest or replicate):
            t1 = time.perf_counter()
            sink(named)
            sink_s += time.perf_counter() - t1
        del named
    return {"seconds": time.perf_counter() - t0, "plan_seconds": plan_s, "sink_seconds": sink_s, "bytes_received": moved,
            "bytes_sent": sent, "buckets": len(parts), "buckets_assembled": assembled,
            "bytes_total": sum(u.nbytes for u in units)}


def stage_senders(group=None) -> list[int]:
    """Collective. For every rank of ``group``, the rank that sends its weights under ``by_stage``: the first rank
    of its pipeline stage (megatron's parallel state)."""
    from megatron.core import parallel_state as ps

    stages = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, ps.get_pipeline_model_parallel_rank(), group=group)
    return [stages.index(s) for s in stages]


def _assemble(bucket: list[Unit], mine: dict, dev, g, group, me: int, copy: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The assembler ``me``: the bucket's full tensors from its own pieces and the ones the other ranks send.
    A unit this rank holds whole is its own tensor, not a copy (unless ``copy``: a sink that keeps or shares it);
    contiguous pieces (row shards, whole experts/layers) land in place; a column shard goes through one piece-sized
    buffer."""
    full, works = [], []
    for u in bucket:
        whole = None if copy else _held_whole(u, mine, me, dev)
        if whole is not None:  # an expert, a PP layer, a replicated norm: lent as it is (the sinks only read)
            full.append((u.name, whole))
            continue
        out = torch.empty(u.shape, dtype=getattr(torch, u.dtype), device=dev)
        for rank, off, shp in u.pieces:
            view = out[tuple(slice(o, o + s) for o, s in zip(off, shp))]
            if rank == me:
                view.copy_(mine[(u.name, off)])
            elif view.is_contiguous():
                works.append(dist.irecv(view, src=g(rank), group=group))
            else:
                for w in works:
                    w.wait()
                works = []
                tmp = torch.empty(shp, dtype=out.dtype, device=out.device)
                dist.recv(tmp, src=g(rank), group=group)
                view.copy_(tmp)
        full.append((u.name, out))
    for w in works:
        w.wait()
    return full


def _held_whole(u: Unit, mine: dict, me: int, dev) -> torch.Tensor | None:
    """The unit as one view of this rank's memory, when its pieces are all here and lie end to end in one storage
    in row order (one piece, or SwiGLU's fc1 that megatron describes as its gate and up halves); else None."""
    if any(r != me for r, _, _ in u.pieces):
        return None
    ts = [mine[(u.name, off)] for _, off, _ in sorted(u.pieces, key=lambda p: p[1])]
    a = ts[0]
    if a.device != torch.device(dev) or not all(t.is_contiguous() for t in ts):
        return None
    if len(ts) == 1:
        return a
    at = a.storage_offset()
    for t in ts:
        if t.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() or t.storage_offset() != at:
            return None
        at += t.numel()
    if sum(t.numel() for t in ts) != math.prod(u.shape) or any(t.shape[1:] != tuple(u.shape[1:]) for t in ts):
        return None
    return a.new_empty(0).set_(a.untyped_storage(), a.storage_offset(), u.shape)
