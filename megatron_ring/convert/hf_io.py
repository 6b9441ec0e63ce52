"""Reading and writing HF checkpoint folders (safetensors, config, modeling code via auto_map)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..hf import AUTO_MAP, HF_CODE_DIR, HF_CODE_FILES, SUPPORTED_TRANSFORMERS
from .mapping import ConversionError

SHARD_BYTES = 4 * 1024**3


class LazyHF:
    """An HF folder read one tensor at a time: names, shapes and dtypes come from the safetensors headers, data only
    when ``get`` asks for it (the streaming converter holds one layer, not the model). Records what was read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        dtypes = set()
        for f in _hf_files(self.path):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if k in self.where:
                        raise ConversionError(f"{f}: tensor '{k}' appears in more than one shard")
                    sl = fh.get_slice(k)
                    self.where[k], self.shapes[k] = f, tuple(sl.get_shape())
                    dtypes.add(sl.get_dtype())
        one = dtypes.pop() if len(dtypes) == 1 else None
        self.dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(one, torch.float32)
        self.used: set[str] = set()
        self._open: dict[Path, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"{self.path}: no tensor '{name}'")
        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        self.used.add(name)
        return self._open[f].get_tensor(name)


def _hf_files(p: Path) -> list[Path]:
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{p}: no *.safetensors files")
    index = p / "model.safetensors.index.json"
    if index.exists():
        listed = set(json.loads(index.read_text())["weight_map"].values())
        absent = sorted(f for f in listed if not (p / f).exists())
        if absent:
            raise ConversionError(f"{index}: lists shard(s) that are missing: {absent}")
    return files


def read_hf_state(path: str | Path) -> dict[str, torch.Tensor]:
    hf = LazyHF(path)
    return {k: hf.get(k) for k in hf.where}


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


def write_hf_checkpoint(state, cfg: dict[str, Any], out: str | Path, tokenizer_dir: str | Path | None = None,
                        check=None) -> Path:
    """safetensors (sharded above 4 GiB, with an index), config.json with auto_map, modeling code,
    generation_config.json, and the tokenizer files when given. ``state``: a dict, or an iterable of (name, tensor)
    consumed as it comes: each shard is written when full and dropped (host memory: one shard, not the model).
    ``check(shapes)`` runs on all names and shapes before the config is written (a folder without config.json is
    not a checkpoint)."""
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    for old in o.glob("model*.safetensors*"):
        old.unlink()
    items = state.items() if isinstance(state, dict) else state
    shard: dict[str, torch.Tensor] = {}
    files: list[tuple[Path, list[str]]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    size = total = 0
    dtype = None

    def flush():
        f = o / f"model-part{len(files) + 1:05d}.safetensors"
        save_file(shard, str(f), metadata={"format": "pt"})
        files.append((f, list(shard)))
        shard.clear()

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shard[name] = t.contiguous()
        shapes[name], dtype = tuple(t.shape), dtype or t.dtype
        size += nbytes
        total += nbytes
    if shard:
        flush()
    if check is not None:
        check(shapes)
    if len(files) == 1:
        files[0][0].rename(o / "model.safetensors")
    else:
        weight_map = {}
        for i, (f, names) in enumerate(files, 1):
            fname = f"model-{i:05d}-of-{len(files):05d}.safetensors"
            f.rename(o / fname)
            weight_map.update({k: fname for k in names})
        (o / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (o / "config.json").write_text(json.dumps(hf_export_config(cfg, dtype), indent=2, sort_keys=True) + "\n")
    for f in HF_CODE_FILES:
        shutil.copy(HF_CODE_DIR / f, o / f)
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
           "pad_token_id": cfg.get("pad_token_id"), "do_sample": True, "temperature": 1.0, "top_p": 0.95}
    (o / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        for change in ship_tokenizer(tokenizer_dir, o):
            print(f"export: tokenizer: {change}", file=sys.stderr)
    return o


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    for f in TOKENIZER_FILES:
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, Path(dst) / f)


def ship_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """The tokenizer of an export: ``src``'s files, the reasoning tags made plain added tokens (SGLang's default
    decoding then keeps them, and its reasoning parser finds ``</think>``), and the chat template of the layout SFT
    trained on (``CHAT_TEMPLATE``: every assistant turn ends with ``<|endoftext|>``; the published Ling-lite template
    ends none, so multi-turn prompts would differ from training). Returns what was changed."""
    from ..tokenizer.serving_check import reasoning_tags_not_special, training_chat_template

    copy_tokenizer(src, dst)
    return reasoning_tags_not_special(dst) + training_chat_template(dst)
