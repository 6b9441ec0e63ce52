"""``megatron-ring convert hf-to-mcore | mcore-to-hf``.

Conversion runs in one process on the full model (TP1/PP1/EP1) and writes a megatron dist checkpoint,
which is layout-free: training loads it at any TP/PP/EP, and a checkpoint saved at any layout
converts back the same way. Neither direction finishes unless every tensor on both sides is
accounted for.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config.recipe import PrecisionConfig, Recipe
from ..model.hf_config import load_hf_config, map_hf_config
from .hf_io import read_hf_state, write_hf_checkpoint
from .mapping import ConversionError, _canonical, check_convertible, hf_to_mcore, mcore_to_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def conversion_recipe(cfg: dict, dtype: torch.dtype = torch.float32) -> Recipe:
    return Recipe(name="convert", hf_config=cfg,
                  precision=PrecisionConfig(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                            transformer_impl="local"))


def _single_process_model(recipe: Recipe):
    import torch.distributed as dist

    from ..model.build import build_model
    from ..parallel.dist import init_distributed

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("conversion runs in a single process (the dist checkpoint it writes loads at any layout)")
    init_distributed(recipe.parallel, recipe.seed)
    return build_model(recipe)


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full megatron state (canonical local-spec names) into a TP1/PP1/EP1 model; every
    parameter must be set and every tensor used."""
    params = {_canonical(n): p for n, p in model.named_parameters()}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ConversionError(f"model/checkpoint mismatch: model parameters without a tensor {missing[:5]}, "
                              f"tensors without a parameter {extra[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ConversionError(f"'{n}': model shape {tuple(p.shape)} != tensor shape {tuple(state[n].shape)}")
            p.copy_(state[n])


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_canonical(n): p.detach().clone() for n, p in model.named_parameters()}


def hf_to_mcore_checkpoint(hf_dir: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    cfg = load_hf_config(hf_dir)
    check_convertible(cfg)
    map_hf_config(cfg)
    hf = read_hf_state(hf_dir)  # verified against cfg inside hf_to_mcore
    mc = hf_to_mcore(hf, cfg)
    recipe = conversion_recipe(cfg, DTYPES[dtype])
    model = _single_process_model(recipe)
    load_full_state(model, {k: v.to(DTYPES[dtype]) for k, v in mc.items()})
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(model, tmp, cfg, iteration=0, parallel={"tensor_model_parallel_size": 1},
                    extra={"source": str(hf_dir)})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def mcore_to_hf_checkpoint(ckpt: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None,
                           dtype: str | None = None) -> Path:
    cfg = load_hf_config(Path(ckpt) / "config.json")
    check_convertible(cfg)
    recipe = conversion_recipe(cfg, torch.float32)
    model = _single_process_model(recipe)
    load_checkpoint(model, ckpt, cfg)
    hf = mcore_to_hf(full_state(model), cfg)
    if dtype:
        hf = {k: v.to(DTYPES[dtype]) for k, v in hf.items()}
    return write_hf_checkpoint(hf, cfg, out, tokenizer_dir)
