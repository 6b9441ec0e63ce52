"""Run under torchrun (1 rank): the checkpoint keys of our local-spec build (MoE and dense layers), and what
loading does when the model asks for keys the checkpoint lacks (a TE module's ``_extra_state``; a real tensor)."""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megatron_ring.checkpoint import load_sharded
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.parallel.dist import init_distributed
    from pathlib import Path

    cfg = load_hf_config(a.ckpt)
    recipe = load_recipe("tiny", {"hf_config": cfg, "precision": {"transformer_impl": "local"}})
    init_distributed(recipe.parallel, seed=1)
    def keys(m):  # the keys a dist checkpoint stores (layers stacked: decoder.layers.<name>)
        return sorted({getattr(v, "key", k) for k, v in m.sharded_state_dict().items()})

    out = {"moe": keys(build_model(recipe))}
    dense = load_recipe("tiny", {"hf_config": {**cfg, "first_k_dense_replace": 1}, "precision": {"transformer_impl": "local"}})
    out["dense"] = keys(build_model(dense))

    model = build_model(recipe)
    sd = model.sharded_state_dict()
    # what a TE module adds: FP8 metadata as a ShardedObject, absent from a checkpoint written without TE
    te_only = "decoder.layers.self_attention.core_attention._extra_state"  # TE's DotProductAttention has one
    assert te_only not in sd
    sd[te_only] = ShardedObject(te_only, None, (1,), (0,), replica_id=0)
    load_sharded(sd, Path(a.ckpt) / "dist")
    out["extra_state_tolerated"] = True
    sd = model.sharded_state_dict()
    sd["decoder.layers.pre_mlp_layernorm.bogus"] = ShardedTensor.from_rank_offsets(
        "decoder.layers.pre_mlp_layernorm.bogus", torch.zeros(4), replica_id=0)
    try:
        load_sharded(sd, Path(a.ckpt) / "dist")
        out["absent_tensor_error"] = None
    except RuntimeError as e:
        out["absent_tensor_error"] = str(e)
    Path(a.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
