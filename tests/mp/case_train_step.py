"""Run under torchrun: load a dist checkpoint at a layout, run N optimizer steps on a fixed global
batch, write the per-step losses and grad norms (rank 0)."""
import argparse
import json

import torch


def global_batch(vocab_size: int, rows: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch (tokens [rows, seq+1], loss mask [rows, seq]); also used by the HF reference."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(2, vocab_size, (rows, seq + 1), generator=g)
    mask = torch.ones(rows, seq)
    mask[:, : seq // 4] = 0  # a prompt part without loss
    return tokens, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--recompute", choices=["full", "selective"], help="activation recompute (memory section)")
    ap.add_argument("--dist-opt", action="store_true", help="distributed optimizer (memory section)")
    ap.add_argument("--aux", type=float, default=1e-2, help="moe_aux_loss_coeff")
    ap.add_argument("--z", type=float, default=1e-3, help="moe_z_loss_coeff")
    ap.add_argument("--save", help="save the trained model and its optimizer state as a dist checkpoint here")
    ap.add_argument("--resume", help="load model and optimizer state from a checkpoint written with --save")
    ap.add_argument("--bucket-params", type=int, help="DDP bucket size in parameters (default: megatron's)")
    ap.add_argument("--weights-out", help="after the steps, the weights as the RL sync streams them (rank 0 writes "
                                          "each HF tensor's float64 sum and sum of squares here)")
    ap.add_argument("--te-adam", action="store_true",
                    help="megatron builds TE FusedAdam's stand-in (tests/mp/te_adam.py)")
    a = ap.parse_args()
    if a.te_adam:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        import te_adam

        te_adam.install()

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ring.checkpoint import load_checkpoint
    from megatron_ring.config.recipe import MemoryConfig, MoELossConfig, ParallelConfig, PrecisionConfig, Recipe
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.parallel.dist import init_distributed
    from megatron_ring.training.core import OptimConfig, build_optimizer, train_step, wrap_ddp

    cfg = load_hf_config(a.ckpt)
    recipe = Recipe(name="t", hf_config=cfg, precision=PrecisionConfig(transformer_impl="local"),
                    moe=MoELossConfig(moe_aux_loss_coeff=a.aux, moe_z_loss_coeff=a.z or None),
                    parallel=ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                            expert_model_parallel_size=a.ep),
                    memory=MemoryConfig(recompute_granularity=a.recompute,
                                        recompute_method="uniform" if a.recompute == "full" else None,
                                        recompute_num_layers=1 if a.recompute == "full" else None,
                                        use_distributed_optimizer=a.dist_opt))
    recipe.memory.check()
    init_distributed(recipe.parallel, seed=7)
    model = build_model(recipe)
    ddp = wrap_ddp(model, use_distributed_optimizer=a.dist_opt, bucket_size=a.bucket_params)
    opt = build_optimizer([ddp], OptimConfig(lr=1e-3, use_distributed_optimizer=a.dist_opt))
    load_checkpoint(model, a.resume or a.ckpt, cfg, optimizer=opt if a.resume else None)

    tokens, mask = global_batch(cfg["vocab_size"], a.global_batch, a.seq)
    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = a.global_batch // dp
    rows = slice(dpr * per_rank, (dpr + 1) * per_rank)
    mbs = [{"tokens": tokens[rows][i:i + a.micro_batch, :-1], "labels": tokens[rows][i:i + a.micro_batch, 1:],
            "loss_mask": mask[rows][i:i + a.micro_batch]} for i in range(0, per_rank, a.micro_batch)]
    hist = []
    for _ in range(a.steps):
        hist.append(train_step([ddp], opt, list(mbs), len(mbs), a.seq, a.micro_batch))
    if a.weights_out:  # what the RL weight sync sends after the update (an optimizer shard left ungathered shows)
        from megatron_ring.rl.weights import stream_hf_weights

        seen = {}

        def sink(named):
            for n, t in named:
                seen[n] = [t.double().sum().item(), t.double().pow(2).sum().item()]

        stream_hf_weights(model, cfg, sink, bucket_bytes=1 << 20)
        if dist.get_rank() == 0:
            with open(a.weights_out, "w") as f:
                json.dump(seen, f)
    held = None
    if a.save:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        from megatron_ring import optim_state
        from megatron_ring.checkpoint import save_checkpoint

        # the optimizer state this rank holds to save: gathered to DP rank 0 only (megatron's mem-efficient save)
        mine = optim_state.sharded_for_save(opt, model.sharded_state_dict())["optimizer_state"].values()
        mine = [sum(v.data.numel() for v in mine if isinstance(v, ShardedTensor) and ".experts." not in v.key
                    and v.data is not None),
                sum(v.data.numel() for v in mine if isinstance(v, ShardedTensor) and ".experts." in v.key)]
        held = [None] * dist.get_world_size()
        dist.all_gather_object(held, mine)

        save_checkpoint(model, a.save, cfg, iteration=a.steps, parallel=recipe.parallel.sizes(), optimizer=opt)
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            opts = getattr(opt, "chained_optimizers", [opt])
            from megatron_ring.optim_state import adam_step

            json.dump({"steps": hist, "dp": dp, "optim_numel_to_save": held, "adam_step": adam_step(opt), "n_opt": len(opts),
                       "overlap_grad_reduce": ddp.ddp_config.overlap_grad_reduce,
                       "overlap_param_gather": ddp.ddp_config.overlap_param_gather,
                       "no_sync_wired": model.config.no_sync_func == ddp.no_sync,
                       "grad_scale_wired": model.config.grad_scale_func == opt.scale_loss,
                       "buckets": sum(len(b.buckets) for b in ddp.buffers + ddp.expert_parallel_buffers),
                       "inner": sorted({type(o.optimizer).__name__ for o in opts}),
                       "optimizers": sorted({type(o).__name__ for o in opts}),
                       "recompute": model.config.recompute_granularity}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
