"""Trainer -> rollout engine weight sync: the policy's weights as HF-named tensors (the names SGLang's
``bailing_moe`` loader reads), gathered on rank 0. With no model parallelism the full model is on every
rank and the mapping runs in memory; otherwise the shards go through a megatron dist checkpoint (the
always-works path, also SGLang's from-disk fallback), which rank 0 converts to an HF folder in a separate
single-process converter (the full model never has to fit one trainer rank's parallel state)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import save_checkpoint
from ..convert.mapping import mcore_to_hf
from ..convert.run import full_state


def model_parallel_size() -> int:
    return (ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
            * ps.get_expert_model_parallel_world_size())


def gather_hf_state(model: torch.nn.Module, hf_config: dict, scratch: str | Path | None = None
                    ) -> dict[str, torch.Tensor] | None:
    """Collective. The HF-named full state on rank 0 (None elsewhere)."""
    if model_parallel_size() == 1:
        return mcore_to_hf(full_state(model), hf_config) if dist.get_rank() == 0 else None
    import subprocess
    import sys

    from ..convert.hf_io import read_hf_state

    base = Path(scratch or tempfile.gettempdir())
    path, hf_path = base / "weight_sync", base / "weight_sync_hf"
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    save_checkpoint(model, path, hf_config)
    state = None
    if dist.get_rank() == 0:
        r = subprocess.run([sys.executable, "-m", "megatron_ring.cli", "convert", "mcore-to-hf", "--ckpt", str(path),
                            "--out", str(hf_path)], capture_output=True, text=True, env=_single_process_env())
        if r.returncode != 0:
            raise RuntimeError(f"weight sync: converting {path} failed:\n{r.stderr[-3000:]}")
        state = read_hf_state(hf_path)
    dist.barrier()
    return state


def _single_process_env() -> dict:
    """Our environment without the launcher's rank variables (the converter must not join this job)."""
    import os

    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
            "SLURM_NTASKS")
    prefixes = ("TORCHELASTIC_", "GROUP_", "ROLE_")  # e.g. TORCHELASTIC_USE_AGENT_STORE would join the agent's store
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(prefixes)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the converter runs on the CPU (the full model does not fit a trainer's GPU)
    return env
