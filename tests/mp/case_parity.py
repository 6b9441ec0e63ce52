"""Run under torchrun: load a megatron dist checkpoint at a given layout and compare its logits and
loss with the HF model on the same weights. Writes a JSON report (from the last pipeline stage)."""
import argparse
import json
import os

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--dispatcher", default="alltoall")
    ap.add_argument("--greedy", type=int, default=0)
    a = ap.parse_args()

    from megatron_ring.checkpoint import load_checkpoint
    from megatron_ring.config.recipe import ParallelConfig, PrecisionConfig, Recipe
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.model.inference import forward_logits, greedy_generate
    from megatron_ring.parallel.dist import init_distributed

    cfg = load_hf_config(a.hf)
    recipe = Recipe(name="parity", hf_config=cfg, precision=PrecisionConfig(transformer_impl="local"),
                    parallel=ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                            expert_model_parallel_size=a.ep, moe_token_dispatcher_type=a.dispatcher))
    init_distributed(recipe.parallel, seed=7)
    model = build_model(recipe)
    load_checkpoint(model, a.ckpt, cfg)

    g = torch.Generator().manual_seed(123)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 24), generator=g)
    logits = forward_logits(model, tokens)
    report = {}
    if logits is not None:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(a.hf, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(tokens, use_cache=False).logits.float()
        loss_m = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss_h = torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        report = {"max_abs_diff": (logits - ref).abs().max().item(), "loss_megatron": loss_m.item(),
                  "loss_hf": loss_h.item(), "shape": list(logits.shape)}
    if a.greedy:
        prompt = tokens[:, :6]
        mg = greedy_generate(model, prompt, a.greedy)
        if logits is not None:
            with torch.no_grad():
                hg = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.greedy,
                                 do_sample=False, eos_token_id=None, pad_token_id=cfg.get("pad_token_id"),
                                 min_new_tokens=a.greedy)
            report.update(greedy_megatron=mg.tolist(), greedy_hf=hg.tolist())
    if report:
        with open(a.out, "w") as f:
            json.dump(report, f)
    import torch.distributed as dist

    dist.barrier()


if __name__ == "__main__":
    main()
