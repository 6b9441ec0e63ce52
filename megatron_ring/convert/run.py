"""``megatron-ring convert hf-to-mcore | mcore-to-hf``.

Conversion runs in one process on the full model (TP1/PP1/EP1) and writes a megatron dist checkpoint,
which is layout-free: training loads it at any TP/PP/EP, and a checkpoint saved at any layout
converts back the same way. Neither direction finishes unless every tensor on both sides is
accounted for.

Both directions run on the CPU (a GPU is never touched: 16.8B parameters do not fit one) in the checkpoint's own
dtype, streaming: the megatron model is built on the ``meta`` device (no memory) and each parameter is set from one
HF tensor as it is read; back to HF, each megatron tensor leaves memory as its HF tensors are written, shard by
shard. Peak host memory ~ the model in its dtype plus one layer (tests/test_conversion.py measures it).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config.recipe import PrecisionConfig, Recipe
from ..model.hf_config import load_hf_config, map_hf_config
from .hf_io import LazyHF, write_hf_checkpoint
from .mapping import (ConversionError, _canonical, check_convertible, hf_to_mcore_items, mcore_to_hf_items,
                      verify_hf_shapes)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def conversion_recipe(cfg: dict, dtype: torch.dtype = torch.float32) -> Recipe:
    return Recipe(name="convert", hf_config=cfg,
                  precision=PrecisionConfig(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                            transformer_impl="local"))


def _single_process_model(recipe: Recipe, meta: bool = False):
    """The full model in this process on the CPU (``meta``: parameters without storage, set one by one later)."""
    import torch.distributed as dist

    from ..model.build import build_model
    from ..parallel.dist import init_distributed

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("conversion runs in a single process (the dist checkpoint it writes loads at any layout)")
    init_distributed(recipe.parallel, recipe.seed, cpu=True)
    if not meta:
        return build_model(recipe)
    with torch.device("meta"):
        model = build_model(recipe)
    for n, p in model.named_parameters():
        if p.device.type != "meta":
            raise RuntimeError(f"'{n}' was allocated on {p.device} while building on the meta device")
    return model


def _materialize(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter ``name`` by one holding ``tensor`` (megatron's attributes kept)."""
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    old = mod._parameters[leaf]
    new = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    mod._parameters[leaf] = new


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


def hf_to_mcore_checkpoint(hf_dir: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """``dtype``: of the megatron checkpoint (default: the HF checkpoint's own)."""
    cfg = load_hf_config(hf_dir)
    check_convertible(cfg)
    map_hf_config(cfg)
    hf = LazyHF(hf_dir)
    verify_hf_shapes(hf.shapes, cfg)  # names and shapes from the headers, before any data is read
    dt = DTYPES[dtype] if dtype else hf.dtype
    model = _single_process_model(conversion_recipe(cfg, dt), meta=True)
    params = {_canonical(n): (n, p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, t in hf_to_mcore_items(hf.get, cfg):
            n, p = params.pop(name, (None, None))
            if p is None:
                raise ConversionError(f"tensor '{name}' has no parameter in the megatron model")
            if p.shape != t.shape:
                raise ConversionError(f"'{name}': model shape {tuple(p.shape)} != tensor shape {tuple(t.shape)}")
            _materialize(model, n, t.to(dt))
    unused = sorted(set(hf.shapes) - hf.used)
    if params or unused:
        raise ConversionError(f"model/checkpoint mismatch: parameters without a tensor {sorted(params)[:5]}, "
                              f"HF tensors not used {unused[:5]}")
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


def checkpoint_dtype(ckpt: str | Path) -> torch.dtype:
    """The dtype the model's tensors are stored in (a training checkpoint's bf16 parameters, not its fp32 optimizer)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(Path(ckpt) / "dist"))
    for k, v in meta.items():
        if k.startswith(("decoder.", "embedding.", "output_layer.")) and hasattr(v, "dtype"):
            return v.dtype
    return torch.float32


def mcore_to_hf_checkpoint(ckpt: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None,
                           dtype: str | None = None) -> Path:
    """``dtype``: of the HF checkpoint (default: the megatron checkpoint's own)."""
    cfg = load_hf_config(Path(ckpt) / "config.json")
    check_convertible(cfg)
    if tokenizer_dir is not None:  # refused before any weight is read: vocab, eos, pad, reasoning tags, template
        from ..tokenizer.serving_check import check_tokenizer_source

        check_tokenizer_source(tokenizer_dir, cfg)
    stored = checkpoint_dtype(ckpt)
    model = _single_process_model(conversion_recipe(cfg, stored), meta=True)
    for n, p in list(model.named_parameters()):  # storage for what the checkpoint loads into (no init)
        _materialize(model, n, torch.empty(p.shape, dtype=stored))
    load_checkpoint(model, ckpt, cfg)
    mc = {n: p.detach() for n, p in model.named_parameters()}
    del model, p
    want = DTYPES[dtype] if dtype else None
    items = ((k, v.to(want) if want else v) for k, v in mcore_to_hf_items(mc, cfg, consume=True))
    return write_hf_checkpoint(items, cfg, out, tokenizer_dir, check=lambda shapes: verify_hf_shapes(shapes, cfg))


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_canonical(n): p.detach().clone() for n, p in model.named_parameters()}
