"""Run under torchrun: the in-memory bucketed weight sync at a TP/EP/PP layout, against the exported HF folder.

Rank 0 (with ``--disk``: every rank, each writing what it assembles) compares every HF tensor it receives with the
export (bit for bit) as buckets arrive; every rank measures the peak of the memory it allocates while syncing
(torch's CPU allocator, through the profiler's memory events)."""
import argparse
import json
import os


def peak_bytes(prof) -> int:
    evs = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in evs:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--bucket-bytes", type=int, default=64 << 10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--disk", help="through the disk transport into this folder (every rank writes what it assembles)")
    a = ap.parse_args()

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from megatron_ring.checkpoint import load_checkpoint
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.convert.hf_io import read_hf_state
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.parallel.dist import init_distributed
    from megatron_ring.rl.weights import plan, stream_hf_weights

    cfg = load_hf_config(a.ckpt)
    recipe = load_recipe("tiny", {"hf_config": cfg, "precision": {"transformer_impl": "local"}, "parallel": {
        "tensor_model_parallel_size": a.tp, "expert_model_parallel_size": a.ep, "pipeline_model_parallel_size": a.pp}})
    init_distributed(recipe.parallel, seed=1)
    model = build_model(recipe)
    load_checkpoint(model, a.ckpt, cfg)
    want = read_hf_state(a.export) if dist.get_rank() == 0 or a.disk else {}
    units, _ = plan(model, cfg)
    largest = max(u.nbytes for u in units)
    got, diffs, sizes = [], [], []

    def sink(named):
        sizes.append(sum(t.nbytes for _, t in named))
        for name, t in named:
            got.append(name)
            ref = want[name]
            if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
                diffs.append(name)

    before = set(os.listdir("."))
    tr = None
    if a.disk:
        from megatron_ring.rl.transport import DiskTransport

        tr = DiskTransport([], a.disk, cfg)
        tr.begin(1)  # a first version, removed by the second
        stream_hf_weights(model, cfg, tr.bucket, bucket_bytes=a.bucket_bytes, spread=True)
        tr.end()
        tr.begin(2)

        def sink(named, check=sink):
            check(named)
            tr.bucket(named)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        figures = stream_hf_weights(model, cfg, sink, bucket_bytes=a.bucket_bytes, spread=bool(a.disk))
    if tr is not None:
        tr.end()
    res = {"rank": dist.get_rank(), "peak_extra_bytes": peak_bytes(prof), "largest_tensor_bytes": largest,
           "bucket_bytes": a.bucket_bytes, "files_written": sorted(set(os.listdir(".")) - before), **figures,
           "names": got, "diffs": diffs, "bucket_sizes": sizes}
    if dist.get_rank() == 0:
        res.update(expected=sorted(want), dtypes=sorted({str(t.dtype) for t in want.values()}))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, res)
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(every, f)


if __name__ == "__main__":
    main()
