"""Optimizer state in a checkpoint, keyed by model parameter only, so that a training checkpoint resumes at
another layout.

megatron-core's optimizer ``sharded_state_dict`` nests its state by the optimizer's own structure: one
optimizer at EP1, a ``ChainedOptimizer`` of a dense and an expert optimizer at EP>1 (``{0: ..., 1: ...}``, and
``chained_i.`` prefixes on the keys), with the parameter groups and the step count as non-sharded ("common")
data in that structure. A checkpoint written at EP1 therefore does not load at EP2 and back ("Different dict
keys encountered in apply_factory_merges"). Here every sharded tensor of the optimizer state (Adam moments,
fp32 master copies, the distributed optimizer's state in megatron's ``fully_reshardable`` format — its
``fully_sharded_model_space`` default raises in 0.19.2) is stored flat under its own key
(``optimizer.state.exp_avg.<model key>``, no chain prefix), and the one common number that matters, Adam's
step count, beside it. The parameter groups (learning rates, weight decay) are not restored from the
checkpoint: the trainer rebuilds them from its recipe and the restored LR scheduler.
"""
from __future__ import annotations

from typing import Any

import torch

LAYOUT = "by-parameter-key/1"  # the value of "optimizer" in megatron_ring.json
METADATA = {"chained_optim_avoid_prefix": True, "distrib_optim_sharding_type": "fully_reshardable"}
# on save, megatron's memory-efficient variant: each DP group's state is gathered over gloo to its DP rank 0 only
# (distrib_optimizer.py: sharded_param_state_fully_reshardable). Without it every DP rank gathers the whole state
# over NCCL into GPU receive buffers and a host copy (~27 GB of host RAM per rank per ling_lite save on 8 GPUs).
# The checkpoint it writes loads the same way (megatron: "from MCore perspective they are interchangeable").
SAVE_METADATA = {**METADATA, "distrib_optim_fully_reshardable_mem_efficient": True}


def _inner(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _flat(tree: Any) -> dict[str, Any]:
    """Every sharded entry under a container name made of its checkpoint key and its rank in this rank's walk
    (a rank holds several entries of one key, e.g. the factories of its local experts' stacked weights). The
    names only pair the load request with the spec it came from; the checkpoint finds data by key and slice."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    out: dict[str, Any] = {}
    for leaf in (v for v in nested_values(tree) if isinstance(v, ShardedBase)):
        n = 0
        while f"{leaf.key}#{n}" in out:
            n += 1
        out[f"{leaf.key}#{n}"] = leaf
    return out


def _replace(tree: Any, loaded: dict[str, Any], names: dict[int, str]) -> Any:
    """The spec with each sharded entry replaced by what was loaded for it (megatron's own dict/list map)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    def one(v):
        if isinstance(v, ShardedBase):
            return loaded[names[id(v)]]
        if isinstance(v, LocalNonpersistentObject):  # what dist_checkpointing.load hands back for these
            return v.unwrap()
        return v

    return dict_list_map_outplace(one, tree)


def _per_parameter_step(inner) -> bool:
    """Where Adam keeps its step count: torch's Adam/AdamW in every parameter's state (a tensor); TE's and apex's
    FusedAdam (megatron's optimizer on a GPU) in each parameter group (``group["step"]``), with a fixed set of
    per-parameter state names (TE maps each through ``name_to_dtype_map``: any other name is a KeyError)."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def adam_step(optimizer) -> int:
    """Adam's step count (megatron keeps it equal on every parameter / group; 0 before the first update)."""
    for o in _inner(optimizer):
        inner = o.optimizer
        if _per_parameter_step(inner):
            for st in inner.state.values():
                if "step" in st:
                    return int(st["step"])
        else:  # (megatron's own distributed optimizer reads it there: distrib_optimizer.py "for TE FusedAdam")
            steps = [int(g["step"]) for g in inner.param_groups if g["params"] and "step" in g]
            if steps:
                return max(steps)
    return 0


def _put_step(d: dict, step: int) -> None:
    """Write Adam's step count where each megatron optimizer's ``load_state_dict`` reads it."""
    if "param_state" in d:  # DistributedOptimizer: in its parameter groups
        for g in d["optimizer"]["param_groups"]:
            g["step"] = step
    elif "state" in d:  # FP32Optimizer
        d["state"]["common_step"] = step
    else:  # Float16Optimizer (bf16/fp16 params with fp32 master copies)
        d["optimizer"]["state"]["common_step"] = step


def sharded_for_save(optimizer, model_sd: dict) -> dict:
    """What goes into the dist checkpoint beside the model's tensors."""
    tree = optimizer.sharded_state_dict(model_sd, metadata=dict(SAVE_METADATA))
    return {"optimizer_state": _flat(tree), "optimizer_adam_step": adam_step(optimizer)}


def spec_for_load(optimizer, model_sd: dict) -> tuple[dict, Any]:
    """(the entries to request from the checkpoint, the optimizer's own nested spec to fill in after)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for o in _inner(optimizer):
        # a fresh distributed optimizer has no state yet: allocate the moments; over torch's Adam its state_dict()
        # asserts one common step count, so a step 0 too (then overwritten) — never for TE's FusedAdam, whose
        # state_dict() refuses any state name but its own (the step lives in its parameter groups)
        if isinstance(o, DistributedOptimizer) and o.init_state_fn is not None:
            o.init_state_fn(o.optimizer, o.config)
            if _per_parameter_step(o.optimizer):
                for st in o.optimizer.state.values():
                    st.setdefault("step", torch.tensor(0.0))
    tree = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=dict(METADATA))
    flat = _flat(tree)
    return {"optimizer_state": flat}, (tree, {id(v): k for k, v in flat.items()})


def restore(optimizer, spec: tuple, state: dict) -> None:
    """Fill the optimizer's spec with the loaded tensors, load it, then set Adam's step count."""
    tree, names = spec
    full = _replace(tree, state["optimizer_state"], names)
    step = int(state["optimizer_adam_step"])
    for d in ([full] if len(_inner(optimizer)) == 1 else full.values()):
        _put_step(d, step)
    optimizer.load_state_dict(full)
    # megatron's distributed optimizer hands every parameter the SAME step tensor for torch's Adam, which
    # increments it in place once per parameter: each needs its own
    for o in _inner(optimizer):
        for st in o.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].detach().clone()
