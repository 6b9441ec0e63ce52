"""Megatron dist checkpoints that carry their HF config, refused early when a recipe disagrees.

Layout of a checkpoint directory::

    config.json         the HF config.json of the architecture (bailing_moe)
    megatron_ring.json  format tag, iteration, the parallel layout it was saved with, extra metadata
    dist/               megatron-core dist_checkpointing (layout-free: loads at any TP/PP/EP)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import optim_state
from .model.hf_config import architecture_diff, load_hf_config, map_hf_config

FORMAT = "megatron-ring/2"  # 2: MoE layers' pre-MLP norm under TE's name (model.build.canonical_keys)
OLD_FORMATS = {"megatron-ring/1": "its MoE pre-MLP norms are under megatron's local-spec name; convert the HF "
                                  "model again (megatron-ring convert hf-to-mcore) or re-save with the release that wrote it"}


class CheckpointMismatch(ValueError):
    """The recipe's architecture differs from the checkpoint's config.json."""


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "megatron_ring.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not a megatron-ring checkpoint (no megatron_ring.json)")
    return json.loads(p.read_text())


def check_compatible(path: str | Path, hf_config: dict[str, Any]) -> None:
    """Refuse (before any model is built) a checkpoint whose architecture differs from ``hf_config``."""
    ckpt_cfg = load_hf_config(Path(path) / "config.json")
    diff = architecture_diff(ckpt_cfg, hf_config)
    if diff:
        raise CheckpointMismatch(f"{path}: checkpoint config.json disagrees with the recipe's model: " + "; ".join(diff))


def adopt_architecture(recipe, path: str | Path):
    """The recipe a training run uses, with the architecture of the checkpoint it starts from (or resumes).

    A training recipe does not repeat the model: its ``hf_config`` is null and the checkpoint's ``config.json``
    (a published config with all its fields, as converted) is taken as is. A recipe that does name an architecture
    must agree with the checkpoint, else it is refused here, before any model is built."""
    if recipe.hf_config:
        check_compatible(path, recipe.hf_config)
    cfg = load_hf_config(Path(path) / "config.json")
    map_hf_config(cfg)
    return dataclasses.replace(recipe, hf_config=cfg)


def save_checkpoint(model: torch.nn.Module, path: str | Path, hf_config: dict[str, Any], iteration: int = 0,
                    parallel: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    optimizer=None) -> Path:
    """Collective: every rank calls it with its model chunk (and its megatron optimizer, to save its
    state beside the model's). The parameter all-gathers a DDP left for the next forward are finished first."""
    from megatron.core import dist_checkpointing

    from .training.core import gathered_params

    if not hf_config:  # a checkpoint is only as good as the config.json it carries
        raise ValueError(f"{path}: refusing to save a checkpoint without its model's config (hf_config is empty)")
    p = Path(path)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        (p / "dist").mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    gathered_params(model)
    msd = model.sharded_state_dict()
    sd = {**msd, **optim_state.sharded_for_save(optimizer, msd)} if optimizer is not None else msd
    dist_checkpointing.save(sd, str(p / "dist"), sharded_strategy=save_strategy())
    if rank0:
        (p / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        meta = {"format": FORMAT, "iteration": iteration, "parallel": parallel or {}, **(extra or {})}
        if optimizer is not None:
            meta["optimizer"] = optim_state.LAYOUT
        (p / "megatron_ring.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return p


def save_strategy():
    """megatron's torch_dist writer; with data parallelism, fully parallel (as Megatron-LM's
    ``--ckpt-fully-parallel-save`` and Megatron-Bridge's ``fully_parallel_save``): each tensor replicated over the DP
    group is written by one of its ranks, spread evenly, instead of all by DP rank 0."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    base = get_default_save_sharded_strategy()
    if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size(with_context_parallel=True) < 2:
        return base
    return FullyParallelSaveStrategyWrapper(base, ps.get_data_parallel_group(with_context_parallel=True))


def load_checkpoint(model: torch.nn.Module, path: str | Path, hf_config: dict[str, Any] | None = None,
                    strict: bool = True, optimizer=None) -> dict[str, Any]:
    """Collective: load a dist checkpoint into this rank's model chunk (any TP/PP/EP layout), and into
    ``optimizer`` when given. Returns the checkpoint's metadata."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    if meta.get("format") in OLD_FORMATS:
        raise ValueError(f"{path}: checkpoint format {meta['format']} is no longer read: {OLD_FORMATS[meta['format']]}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r} (want {FORMAT})")
    if hf_config is not None:
        check_compatible(path, hf_config)
    msd = model.sharded_state_dict()
    sd, tree = msd, None
    if optimizer is not None:
        if meta.get("optimizer") != optim_state.LAYOUT:
            raise ValueError(f"{path}: no optimizer state in the layout-free form {optim_state.LAYOUT} (found "
                             f"{meta.get('optimizer')!r}): start from it as an initial model (--init), not a resume")
        request, tree = optim_state.spec_for_load(optimizer, msd)
        sd = {**msd, **request}
    state = load_sharded(sd, Path(path) / "dist")
    if optimizer is not None:
        optim_state.restore(optimizer, tree, state)
    # a training checkpoint also holds optimizer state; its common (non-sharded) part comes back too
    res = model.load_state_dict({k: v for k, v in state.items() if k in msd}, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
    if strict and (missing or res.unexpected_keys):
        raise RuntimeError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {res.unexpected_keys[:5]}")
    return meta


def load_sharded(sharded_state_dict: dict, ckpt_dir: Path) -> dict:
    """``dist_checkpointing.load`` that tolerates exactly one difference between specs: Transformer Engine
    modules ask for ``_extra_state`` (FP8 scaling history), which a checkpoint written without TE lacks
    (they start fresh, as at the first step). Any other requested key the checkpoint lacks is an error naming it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    state, _, absent = dist_checkpointing.load(sharded_state_dict, str(ckpt_dir),
                                               strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in absent if not k.split("/")[0].endswith("_extra_state"))  # (objects: key/shard_i_n)
    if absent:
        raise RuntimeError(f"{ckpt_dir}: the checkpoint lacks {len(absent)} tensor(s) the model needs, e.g. "
                           f"{absent[:5]}")
    return state
