"""Typed recipes: dataclasses + YAML, with megatron-core's own field names.

A model recipe (``tiny``, ``ling_lite``) names the architecture by its HF ``config.json`` (the single source of
truth, also written into every checkpoint); training recipes (SFT, RL) set ``hf_config: null`` and take the
architecture from the checkpoint they start from. Besides: the parallel layout, precision and MoE loss settings.
Unknown keys in a YAML file are errors that name the key and the file; numbers stay numbers (YAML 1.2 floats:
``1e-06`` is a float, not the string YAML 1.1 would make of it).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

RECIPE_DIR = Path(__file__).parent / "recipes"


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2's float syntax: ``1e-06`` / ``1E5`` / ``.5`` are floats (YAML 1.1 needs a dot and a
    signed exponent, and would hand ``rms_norm_eps: 1e-06`` on as the string "1e-06")."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None: 1 when EP>1, else = TP
    context_parallel_size: int = 1
    sequence_parallel: bool = False  # forced on for MoE with TP>1 (megatron requires it)
    moe_token_dispatcher_type: Literal["alltoall", "allgather", "flex"] = "alltoall"  # flex: DeepEP/HybridEP
    moe_flex_dispatcher_backend: Literal["deepep", "hybridep"] = "deepep"

    def resolved_etp(self) -> int:
        if self.expert_tensor_parallel_size is not None:
            return self.expert_tensor_parallel_size
        return 1 if self.expert_model_parallel_size > 1 else self.tensor_model_parallel_size

    def sizes(self) -> dict[str, int]:
        """The group sizes, named as both ``initialize_model_parallel`` and ``TransformerConfig`` name them."""
        return dict(tensor_model_parallel_size=self.tensor_model_parallel_size,
                    pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                    expert_model_parallel_size=self.expert_model_parallel_size,
                    expert_tensor_parallel_size=self.resolved_etp(),
                    context_parallel_size=self.context_parallel_size)

    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class PrecisionConfig:
    bf16: bool = False
    fp16: bool = False
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # needs Transformer Engine
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_param: bool = False
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"


@dataclass
class MoELossConfig:
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None
    moe_router_bias_update_rate: float = 1e-3  # v2 expert-bias routers only


@dataclass
class KernelConfig:
    """Fused kernels. ``None``: on exactly when Transformer Engine runs on a GPU (TEGroupedMLP's checkpoint keys
    equal SequentialMLP's, so a checkpoint moves between the two)."""
    moe_grouped_gemm: Optional[bool] = None
    moe_permute_fusion: Optional[bool] = None
    # the shared experts run on a side CUDA stream while the routed tokens are dispatched (alltoall/flex)
    moe_shared_expert_overlap: Optional[bool] = None
    # megatron's fused vocab-parallel cross-entropy for the LM loss (SFT; compiled, so on a GPU)
    cross_entropy_loss_fusion: Optional[bool] = None


@dataclass
class MemoryConfig:
    """Activation recompute and optimizer-state sharding (megatron-core's names and meanings)."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None  # full recompute only
    recompute_num_layers: Optional[int] = None  # full: layers per chunk (uniform) or recomputed layers (block)
    recompute_modules: Optional[list] = None  # selective: e.g. [core_attn, moe_act, layernorm, mlp]
    use_distributed_optimizer: bool = False  # shard fp32 master weights + Adam moments over DP

    def check(self, where: str = "memory") -> None:
        if self.recompute_granularity == "full" and (self.recompute_method is None or not self.recompute_num_layers):
            raise ValueError(f"{where}: recompute_granularity full needs recompute_method and recompute_num_layers")
        if self.recompute_granularity != "full" and (self.recompute_method or self.recompute_num_layers):
            raise ValueError(f"{where}: recompute_method/recompute_num_layers apply to recompute_granularity full only")
        if self.recompute_modules and self.recompute_granularity != "selective":
            raise ValueError(f"{where}: recompute_modules apply to recompute_granularity selective only")


@dataclass
class Recipe:
    name: str
    hf_config: Optional[dict[str, Any]] = None  # null in training recipes: the checkpoint's config.json
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    moe: MoELossConfig = field(default_factory=MoELossConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    seed: int = 1234
    # Sections owned by later stages (sft, rl, ...) are kept as plain dicts until their loaders read them.
    stages: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__} (known: {sorted(names)})")
    kwargs = {}
    for k, v in data.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            v = _from_dict(t, v, f"{where}.{k}")
        else:
            _check_type(v, t, f"{where}.{k}")
        kwargs[k] = v
    return cls(**kwargs)


def _check_type(value: Any, t: Any, where: str) -> None:
    origin = typing.get_origin(t)
    if origin is Literal:
        if value not in typing.get_args(t):
            raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(t)}")
        return
    if origin is typing.Union:
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                _check_type(value, a, where)
                return
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if errors else f"{where}: bad value {value!r}")
    base = origin or t
    if base is Any:
        return
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if base is int and isinstance(value, bool):
        raise TypeError(f"{where}: expected int, got bool")
    if isinstance(base, type) and not isinstance(value, base):
        raise TypeError(f"{where}: expected {base.__name__}, got {type(value).__name__} ({value!r})")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """Load a recipe by name (``tiny``, ``ling_lite``) or YAML path; ``overrides`` are merged per section."""
    p = Path(name_or_path)
    if not p.suffix:
        p = RECIPE_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            raise FileNotFoundError(f"no recipe named {name_or_path!r}; available: {list_recipes()}")
    data = yaml.load(p.read_text(), Loader=_Loader) or {}
    base = data.pop("base", None)
    if base:
        merged = load_recipe(base).to_dict()
        _deep_merge(merged, data)
        data = merged
    if overrides:
        _deep_merge(data, overrides)
    data.setdefault("name", p.stem)
    recipe = _from_dict(Recipe, data, str(p))
    recipe.memory.check(f"{p}: memory")
    if recipe.hf_config:  # the architecture is checked when the recipe is read, not when a model is built
        from ..model.hf_config import map_hf_config

        try:
            map_hf_config(recipe.hf_config)
        except ValueError as e:
            raise ValueError(f"{p}: hf_config: {e}") from None
    return recipe


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and k != "hf_config_replace":
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
