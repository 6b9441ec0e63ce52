"""Reading and writing HF checkpoint folders (safetensors, config, modeling code via auto_map)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..hf import AUTO_MAP, HF_CODE_DIR, HF_CODE_FILES, SUPPORTED_TRANSFORMERS
from .mapping import ConversionError

SHARD_BYTES = 4 * 1024**3


def read_hf_state(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{p}: no *.safetensors files")
    index = p / "model.safetensors.index.json"
    if index.exists():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        absent = sorted(f for f in listed if not (p / f).exists())
        if absent:
            raise ConversionError(f"{index}: lists shard(s) that are missing: {absent}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k in out:
                    raise ConversionError(f"{f}: tensor '{k}' appears in more than one shard")
                out[k] = fh.get_tensor(k)
    return out


def hf_export_config(cfg: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = dict(cfg)
    out.update(model_type="bailing_moe", architectures=["BailingMoeForCausalLM"], auto_map=dict(AUTO_MAP),
               torch_dtype=str(dtype).replace("torch.", ""),
               # SGLang runs the gate in this dtype; megatron trains an fp32 router
               router_dtype="fp32",
               # the transformers releases the shipped modeling code supports (scripts/hf_compat.sh checks them)
               modeling_code_transformers=SUPPORTED_TRANSFORMERS)
    out.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    return out


def write_hf_checkpoint(state: dict[str, torch.Tensor], cfg: dict[str, Any], out: str | Path,
                        tokenizer_dir: str | Path | None = None) -> Path:
    """safetensors (sharded above 4 GiB, with an index), config.json with auto_map, modeling code,
    generation_config.json, and the tokenizer files when given."""
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(o / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(o / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (o / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (o / "config.json").write_text(json.dumps(hf_export_config(cfg, dtype), indent=2, sort_keys=True) + "\n")
    for f in HF_CODE_FILES:
        shutil.copy(HF_CODE_DIR / f, o / f)
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
           "pad_token_id": cfg.get("pad_token_id"), "do_sample": True, "temperature": 1.0, "top_p": 0.95}
    (o / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, o)
    return o


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for f in TOKENIZER_FILES:
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, Path(dst) / f)
