"""A fresh, randomly initialised HF checkpoint for a recipe (the tiny embedded default starts here)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .config.recipe import load_recipe
from .convert.hf_io import write_hf_checkpoint
from .convert.mapping import verify_hf_state


def init_hf_checkpoint(out: str | Path, recipe: str = "tiny", seed: int = 0, config: str | Path | None = None) -> Path:
    """A random model for a recipe's architecture, or for a HF ``config.json`` as given (``config``: a file or a
    folder holding one, e.g. a published config shrunk in size)."""
    from .hf.configuration_bailing_moe import BailingMoeConfig
    from .hf.modeling_bailing_moe import BailingMoeForCausalLM
    from .model.hf_config import load_hf_config, map_hf_config
    from .tokenizer import build_tiny_tokenizer

    if config is not None:
        cfg = load_hf_config(config)
    else:
        cfg = load_recipe(recipe).hf_config
        if not cfg:
            raise ValueError(f"recipe {recipe} names no architecture (hf_config: null); use a model recipe or --config")
        cfg = dict(cfg)
    map_hf_config(cfg)  # refused before anything is built
    torch.manual_seed(seed)
    model = BailingMoeForCausalLM(BailingMoeConfig(**cfg))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    verify_hf_state(state, cfg)
    with tempfile.TemporaryDirectory() as td:
        build_tiny_tokenizer(cfg["vocab_size"], td, seed=seed)
        return write_hf_checkpoint(state, cfg, out, tokenizer_dir=td)
