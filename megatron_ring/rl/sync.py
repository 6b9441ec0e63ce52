"""Trainer -> rollout engine weight sync: the policy's weights as HF-named tensors (the names SGLang's
``bailing_moe`` loader reads), gathered on rank 0. With no model parallelism the full model is on every
rank and the mapping runs in memory; otherwise the shards go through a megatron dist checkpoint (the
always-works path, also SGLang's from-disk fallback) and rank 0 reads it back as plain full tensors."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import save_checkpoint
from ..convert.mapping import _canonical, mcore_to_hf
from ..convert.run import full_state


def model_parallel_size() -> int:
    return (ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
            * ps.get_expert_model_parallel_world_size())


def gather_hf_state(model: torch.nn.Module, hf_config: dict, scratch: str | Path | None = None
                    ) -> dict[str, torch.Tensor] | None:
    """Collective. The HF-named full state on rank 0 (None elsewhere)."""
    if model_parallel_size() == 1:
        return mcore_to_hf(full_state(model), hf_config) if dist.get_rank() == 0 else None
    from megatron.core.dist_checkpointing import load_plain_tensors

    base = Path(scratch or tempfile.gettempdir())
    path = base / "weight_sync"
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    save_checkpoint(model, path, hf_config)
    state = None
    if dist.get_rank() == 0:
        plain = load_plain_tensors(str(path / "dist"))
        state = mcore_to_hf({_canonical(k): v for k, v in plain.items() if _is_param(k)}, hf_config)
    dist.barrier()
    return state


def _is_param(name: str) -> bool:
    return not (name.endswith("_extra_state") or "optimizer" in name)
