"""Run under torchrun: where ``build_model`` puts the parameters when megatron runs on a GPU, modelled on the CPU:
``torch.cuda.is_available()`` answers True and ``torch.cuda.current_device()`` names the meta device, so what megatron
creates on "the GPU" lands on meta and whatever is left on the host stays on the CPU (megatron creates the MoE
router's weight and the local spec's norms without a device; Megatron-LM's model.cuda() moves them). Writes the
parameters left on the host, and what ``cpu_compat``'s type-string patch reports for a host tensor (why a CPU run
cannot see the misplacement: megatron's bf16 optimizer checks ``param.type()``, which the patch answers with the
CUDA name)."""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ep", type=int, default=1)
    a = ap.parse_args()

    import torch
    import torch.distributed as dist

    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.parallel.dist import init_distributed

    recipe = load_recipe("tiny", {"hf_config": load_hf_config(a.ckpt), "precision": {"transformer_impl": "local"},
                                  "parallel": {"expert_model_parallel_size": a.ep}})
    init_distributed(recipe.parallel, seed=1)
    real = torch.cuda.is_available, torch.cuda.current_device
    try:
        torch.cuda.is_available = lambda: True
        torch.cuda.current_device = lambda: torch.device("meta")
        model = build_model(recipe)
        gpu_init = not model.config.use_cpu_initialization
    finally:
        torch.cuda.is_available, torch.cuda.current_device = real
    host = sorted(n for n, p in model.named_parameters() if p.device.type != "meta")
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump({"host": host, "params": sum(1 for _ in model.parameters()), "gpu_init": gpu_init,
                       "host_bf16_type": torch.zeros(1, dtype=torch.bfloat16).type()}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
