"""Run under torchrun (1 rank): the loss and every parameter gradient of one packed row equal those of
its sequences run one by one (LM loss only: MoE aux/z losses depend on batch composition)."""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from megatron_ring.checkpoint import load_checkpoint
    from megatron_ring.config.recipe import PrecisionConfig, Recipe
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.parallel.dist import init_distributed
    from megatron_ring.sft.data import collate, packed_row_to_sample

    cfg = load_hf_config(a.ckpt)
    recipe = Recipe(name="p", hf_config=cfg, precision=PrecisionConfig(transformer_impl="local"))
    init_distributed(recipe.parallel, seed=1)
    model = build_model(recipe)
    load_checkpoint(model, a.ckpt, cfg)

    g = torch.Generator().manual_seed(0)
    lens = [7, 11, 5]
    seqs = [torch.randint(6, cfg["vocab_size"], (n,), generator=g).tolist() for n in lens]
    masks = [[0] * (n // 2) + [1] * (n - n // 2) for n in lens]  # prompt part untrained
    L, pad = 32, 1
    tokens = sum(seqs, []) + [pad] * (L - sum(lens))
    mask = sum(masks, []) + [0] * (L - sum(lens))

    def loss_and_grads(batch):
        model.zero_grad()
        per_token = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        loss = (per_token * batch["loss_mask"]).sum()
        loss.backward()
        return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_loss, packed_grads = loss_and_grads(collate([packed_row_to_sample(tokens, mask, lens, pad)]))
    sep_loss, sep_grads = 0.0, {}
    for s, m in zip(seqs, masks):
        l, gr = loss_and_grads(collate([packed_row_to_sample(s, m, [len(s)], pad)]))
        sep_loss += l
        for k, v in gr.items():
            sep_grads[k] = sep_grads.get(k, 0) + v
    gdiff = max((packed_grads[k] - sep_grads[k]).abs().max().item() for k in sep_grads)
    gscale = max(v.abs().max().item() for v in sep_grads.values())
    with open(a.out, "w") as f:
        json.dump({"packed_loss": packed_loss, "separate_loss": sep_loss, "max_grad_diff": gdiff,
                   "max_grad": gscale, "n_grads": len(sep_grads), "n_params": len(list(model.parameters()))}, f)


if __name__ == "__main__":
    main()
