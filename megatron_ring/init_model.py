"""A fresh, randomly initialised HF checkpoint for a recipe (the tiny embedded default starts here)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .config.recipe import load_recipe
from .convert.hf_io import write_hf_checkpoint
from .convert.mapping import verify_hf_state


def init_hf_checkpoint(out: str | Path, recipe: str = "tiny", seed: int = 0) -> Path:
    from .hf.configuration_bailing_moe import BailingMoeConfig
    from .hf.modeling_bailing_moe import BailingMoeForCausalLM
    from .tokenizer import build_tiny_tokenizer

    r = load_recipe(recipe)
    cfg = dict(r.hf_config)
    torch.manual_seed(seed)
    model = BailingMoeForCausalLM(BailingMoeConfig(**cfg))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    verify_hf_state(state, cfg)
    with tempfile.TemporaryDirectory() as td:
        build_tiny_tokenizer(cfg["vocab_size"], td, seed=seed)
        return write_hf_checkpoint(state, cfg, out, tokenizer_dir=td)
