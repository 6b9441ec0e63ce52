"""Run under torchrun: what megatron-core really allocates for one training step of a model at a layout, next to
``model.memory.plan``'s terms for the same recipe: parameter, gradient-buffer and optimizer-state bytes (summed
over the real tensors after one step) and the bytes saved for backward (autograd's saved-tensor hooks, one count
per storage, parameters excluded). Written by rank 0 as JSON {measured: {...}, plan: {...}} (per rank, max)."""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-config", required=True, help="JSON file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dist-opt", action="store_true")
    ap.add_argument("--recompute", choices=["full"])
    a = ap.parse_args()

    import torch
    import torch.distributed as dist

    from megatron_ring.config.recipe import MemoryConfig, ParallelConfig, PrecisionConfig, Recipe
    from megatron_ring.model.build import build_model
    from megatron_ring.model.memory import activation_elems_per_token, plan
    from megatron_ring.parallel.dist import all_reduce_floats, init_distributed
    from megatron_ring.training.core import OptimConfig, build_optimizer, train_step, wrap_ddp

    hf = json.load(open(a.hf_config))
    mem = MemoryConfig(use_distributed_optimizer=a.dist_opt, recompute_granularity=a.recompute,
                       recompute_method="uniform" if a.recompute else None, recompute_num_layers=1 if a.recompute else None)
    recipe = Recipe(name="m", hf_config=hf, precision=PrecisionConfig(transformer_impl="local"),
                    parallel=ParallelConfig(expert_model_parallel_size=a.ep), memory=mem)
    init_distributed(recipe.parallel, seed=3)
    model = build_model(recipe)
    ddp = wrap_ddp(model, use_distributed_optimizer=a.dist_opt)
    opt = build_optimizer([ddp], OptimConfig(lr=1e-4, use_distributed_optimizer=a.dist_opt))

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    # only what the forward pass keeps for backward (a recomputed layer's tensors are saved again during backward)
    forward = [False]
    model.register_forward_pre_hook(lambda m, i: forward.__setitem__(0, True))
    model.register_forward_hook(lambda m, i, o: forward.__setitem__(0, False))

    def pack(t):
        st = t.untyped_storage()
        if forward[0] and st.data_ptr() not in param_ptrs and st.device.type != "meta":
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, hf["vocab_size"], (1, a.tokens + 1), generator=g)
    mb = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, a.tokens)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step([ddp], opt, [mb], 1, a.tokens, 1)

    def nbytes(ts):
        return float(sum(t.numel() * t.element_size() for t in ts))

    weights = nbytes(model.parameters())
    grads = nbytes(b.grad_data for b in ddp.buffers + ddp.expert_parallel_buffers)
    state = []
    for o in getattr(opt, "chained_optimizers", [opt]):
        for st in o.optimizer.state.values():
            state += [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
        for grp in getattr(o, "shard_fp32_from_float16_groups", []) or []:
            state += list(grp)
    measured = {"weights": weights, "gradients": grads, "optimizer": nbytes(state),
                "saved for backward": float(sum(saved.values()))}
    measured = dict(zip(measured, all_reduce_floats(list(measured.values()), op="max")))
    p = plan(hf, recipe, "sft", dist.get_world_size(), 1e6, a.tokens, a.tokens, flash=False, microbatches=1)
    # the plan's terms as saved by the forward pass: its logits/loss term also holds the fp32 logits gradient
    # (4 of its wb + 4 + 4 bytes per logit), its recompute term the one layer recomputed during backward
    layer = activation_elems_per_token(hf, False, a.tokens) * a.tokens * 4
    fwd = p.terms["activations"] - (layer if a.recompute else 0) + p.terms["logits/loss"] * 8 / 12
    if dist.get_rank() == 0:
        json.dump({"measured": measured, "plan": p.terms, "plan saved for backward": fwd}, open(a.out, "w"))
    dist.barrier()


if __name__ == "__main__":
    main()
