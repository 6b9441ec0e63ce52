"""Build the Bailing MoE as a megatron-core ``GPTModel`` from a recipe (its HF config is the truth)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config.recipe import Recipe
from .hf_config import MappedConfig, map_hf_config
from .norm_head import apply_norm_head


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def use_transformer_engine(recipe: Recipe) -> bool:
    impl = recipe.precision.transformer_impl
    if impl == "transformer_engine" and not te_available():
        raise RuntimeError("recipe asks for transformer_impl=transformer_engine but Transformer Engine "
                           "(with CUDA) is not available here")
    use = te_available() if impl == "auto" else impl == "transformer_engine"
    if recipe.precision.fp8 and not use:
        raise RuntimeError(f"precision.fp8={recipe.precision.fp8!r} needs Transformer Engine on a GPU; "
                           "set fp8: null to train without FP8")
    if recipe.precision.fp8 and use:
        check_fp8_recipe(recipe, torch.cuda.get_device_capability())
    return use


def check_fp8_recipe(recipe: Recipe, capability: tuple[int, int]) -> None:
    """Refuse, before building, an FP8 recipe this GPU cannot run: TE's MXFP8 needs compute capability 10.0
    (Blackwell; transformer_engine/pytorch/quantization.py: "Device compute capability 10.0 or higher required
    for MXFP8 execution"), so not an H100/H200 (9.0)."""
    if recipe.precision.fp8 and recipe.precision.fp8_recipe == "mxfp8" and tuple(capability) < (10, 0):
        raise ValueError(f"recipe {recipe.name}: precision.fp8_recipe mxfp8 needs a GPU of compute capability 10.0 "
                         f"or higher (Blackwell); this one is {capability[0]}.{capability[1]}: use delayed, "
                         "tensorwise or blockwise")


@functools.lru_cache(maxsize=1)
def fused_wgrad_available() -> bool:
    """apex's ``fused_weight_gradient_mlp_cuda``: megatron's own ColumnParallelLinear (here the output layer) raises
    at construction when ``gradient_accumulation_fusion`` is on without it. TE's layers fuse without apex
    (``te_wgrad_fusion``)."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def te_wgrad_fusion(model: torch.nn.Module) -> int:
    """Every Transformer Engine layer accumulates its weight gradient straight into megatron's fp32 ``main_grad``
    (TE's ``fuse_wgrad_accumulation``, its own GEMM with accumulate; read at each forward): the setting megatron gives
    TE from ``gradient_accumulation_fusion``, which stays off here for megatron's own layers when apex is absent.
    Without it TE hands back a bf16 wgrad that DDP's hook adds into ``main_grad``: an extra buffer and add per weight
    per micro-batch. Returns how many layers were switched."""
    from transformer_engine.pytorch.module.base import TransformerEngineBaseModule

    n = 0
    for m in model.modules():
        if isinstance(m, TransformerEngineBaseModule) and hasattr(m, "fuse_wgrad_accumulation"):
            m.fuse_wgrad_accumulation = True
            n += 1
    return n


def moe_kernels(recipe: Recipe, te: bool) -> dict:
    """The MoE kernel choices: the recipe's, else on with TE on a GPU; refused where they cannot run."""
    k, par = recipe.kernels, recipe.parallel
    grouped = te if k.moe_grouped_gemm is None else k.moe_grouped_gemm
    permute = te if k.moe_permute_fusion is None else k.moe_permute_fusion
    for name, on in (("moe_grouped_gemm", grouped), ("moe_permute_fusion", permute)):
        if on and not te:
            raise RuntimeError(f"kernels.{name}: true needs Transformer Engine on a GPU (set it to null or false)")
    out = dict(moe_grouped_gemm=grouped, moe_permute_fusion=permute)
    # the shared experts overlap the token dispatch (Megatron-Bridge's Moonlight-16B recipe): megatron runs them on a
    # side CUDA stream, for the alltoall/flex dispatchers only, and not with their activations recomputed
    shared = bool(recipe.hf_config.get("num_shared_experts")) and par.moe_token_dispatcher_type in ("alltoall", "flex")
    shared = shared and "shared_experts" not in (recipe.memory.recompute_modules or [])
    overlap = (te and shared) if k.moe_shared_expert_overlap is None else k.moe_shared_expert_overlap
    if overlap and not (te and shared):
        raise RuntimeError("kernels.moe_shared_expert_overlap: true needs Transformer Engine on a GPU (a CUDA side "
                           "stream), shared experts, the alltoall or flex dispatcher and no shared_experts recompute")
    out["moe_shared_expert_overlap"] = overlap
    if par.moe_token_dispatcher_type == "flex":
        if not te:
            raise RuntimeError("parallel.moe_token_dispatcher_type: flex (DeepEP/HybridEP) needs CUDA, Transformer "
                               "Engine and the DeepEP/HybridEP kernels; use alltoall")
        out["moe_flex_dispatcher_backend"] = par.moe_flex_dispatcher_backend
    return out


def token_multiple(recipe: Recipe) -> int:
    """Micro-batch token counts must be multiples of this: TP (sequence parallelism splits the tokens) x megatron's
    FP8 alignment under FP8 (``fp8_utils.get_fp8_align_size``: TE's FP8 GEMMs take token dimensions in multiples
    of 16 on every rank, 32 for MXFP8)."""
    from megatron.core.fp8_utils import get_fp8_align_size

    p = recipe.precision
    return recipe.parallel.tensor_model_parallel_size * (get_fp8_align_size(p.fp8_recipe) if p.fp8 else 1)


def kernel_settings(recipe: Recipe, te: bool, cuda: bool) -> dict:
    """TransformerConfig's fused-kernel switches: fused kernels exist only with CUDA (+TE/apex); the torch paths
    are numerically the reference. The fused cross-entropy serves megatron's LM loss (SFT); the RL loss computes
    its log-probs and entropy itself (rl/policy.py)."""
    # megatron's fused vocab-parallel CE (one all-reduce, compiled kernels, a bf16 logits gradient); not TE's, which
    # megatron-core 0.19.2 warns "has known stability issues" and Megatron-LM's argument check refuses by default
    ce = cuda if recipe.kernels.cross_entropy_loss_fusion is None else recipe.kernels.cross_entropy_loss_fusion
    if ce and not cuda:
        raise RuntimeError("kernels.cross_entropy_loss_fusion: true needs a GPU (megatron compiles it with "
                           "torch.compile; the CPU runs the unfused reference)")
    return dict(gradient_accumulation_fusion=te and fused_wgrad_available(),
                cross_entropy_loss_fusion=ce, cross_entropy_fusion_impl="native",
                bias_dropout_fusion=cuda, masked_softmax_fusion=cuda and te, apply_rope_fusion=te,
                persist_layer_norm=False, **moe_kernels(recipe, te))


def transformer_config(recipe: Recipe, mapped: MappedConfig | None = None) -> TransformerConfig:
    mapped = mapped or map_hf_config(recipe.hf_config)
    par, prec, moe, mem = recipe.parallel, recipe.precision, recipe.moe, recipe.memory
    te = use_transformer_engine(recipe)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if prec.bf16 else torch.float16 if prec.fp16 else torch.float32
    kw = dict(mapped.transformer)
    kw.update(
        activation_func=F.silu,
        **par.sizes(),
        # megatron requires SP for MoE with TP > 1
        sequence_parallel=par.sequence_parallel or par.tensor_model_parallel_size > 1,
        moe_token_dispatcher_type=par.moe_token_dispatcher_type,
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
        moe_aux_loss_coeff=moe.moe_aux_loss_coeff,
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        bf16=prec.bf16, fp16=prec.fp16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        **kernel_settings(recipe, te, cuda),
        recompute_granularity=mem.recompute_granularity, recompute_method=mem.recompute_method,
        recompute_num_layers=mem.recompute_num_layers,
        # losses are per token over the global batch (training.core); the MoE router reads this when it is
        # built and scales its aux/z losses to match (set later, they come out 1/tokens-per-micro-batch weaker)
        calculate_per_token_loss=True,
    )
    if mem.recompute_modules:
        kw["recompute_modules"] = list(mem.recompute_modules)
    if kw.get("moe_router_enable_expert_bias"):
        kw["moe_router_bias_update_rate"] = moe.moe_router_bias_update_rate
    kw.update(fp8_settings(prec))
    return TransformerConfig(**kw)


def fp8_settings(prec) -> dict:
    """TransformerConfig's FP8 fields: each expert's tokens padded (FP8 GEMMs take multiples of 16); with delayed
    scaling, the amax history of Megatron-Bridge's bf16_with_fp8_delayed_scaling_mixed (1024 steps, reduced by max:
    megatron's default, a one-step history, lets a single spiky step set the next step's scales)."""
    if not prec.fp8:
        return {}
    kw = dict(fp8=prec.fp8, fp8_recipe=prec.fp8_recipe, fp8_param=prec.fp8_param,
              moe_router_padding_for_quantization=True)
    if prec.fp8_recipe == "delayed":
        kw.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return kw


def canonical_keys(block_spec, te: bool):
    """One checkpoint layout whatever the spec: the Transformer Engine one. TE fuses the input norm into
    ``linear_qkv`` (``self_attention.linear_qkv.layer_norm_weight``) and, in dense layers, the pre-MLP norm into
    ``mlp.linear_fc1``; megatron's local spec maps its separate norms onto those names, but it does so for MoE
    layers too, where TE keeps ``pre_mlp_layernorm.weight`` (a router needs the normed input): a local MoE layer
    would save ``mlp.linear_fc1.layer_norm_weight`` and not load a TE checkpoint, nor a TE run its. Drop that one
    remap for the local MoE layers (TE's ``_extra_state`` is handled on load: ``checkpoint.load_checkpoint``)."""
    import copy

    from megatron.core.transformer.moe.moe_layer import MoELayer

    if te:
        return block_spec
    out = copy.copy(block_spec)
    out.layer_specs = []
    for layer in block_spec.layer_specs:
        sub = layer.submodules
        mlp = getattr(sub, "mlp", None)
        cls = getattr(mlp, "func", None) or getattr(mlp, "module", None) or mlp  # a partial or a ModuleSpec
        if isinstance(cls, type) and issubclass(cls, MoELayer) and sub.sharded_state_dict_keys_map:
            layer = copy.copy(layer)
            layer.submodules = sub = copy.copy(sub)
            sub.sharded_state_dict_keys_map = {k: v for k, v in sub.sharded_state_dict_keys_map.items()
                                               if k != "pre_mlp_layernorm."}
        out.layer_specs.append(layer)
    return out


def build_model(recipe: Recipe, pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None, parallel_output: bool = True) -> GPTModel:
    """The GPTModel for this rank's pipeline stage (call after ``init_distributed``)."""
    from megatron.core import parallel_state as ps

    mapped = map_hf_config(recipe.hf_config)
    cfg = transformer_config(recipe, mapped)
    te = use_transformer_engine(recipe)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    spec = canonical_keys(get_gpt_decoder_block_spec(cfg, use_transformer_engine=te, normalization="RMSNorm",
                                                     vp_stage=vp_stage), te)
    vocab = mapped.model["vocab_size"]
    tp = cfg.tensor_model_parallel_size
    if vocab % tp:
        raise ValueError(f"vocab_size {vocab} is not divisible by tensor_model_parallel_size {tp}")
    if mapped.transformer.get("mtp_num_layers"):
        raise NotImplementedError("not supported yet: num_nextn_predict_layers (MTP) in the megatron build")
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=vocab,
        max_sequence_length=mapped.model["max_sequence_length"],
        pre_process=pre_process, post_process=post_process, parallel_output=parallel_output,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_percent=mapped.model.get("rotary_percent", 1.0), rotary_base=mapped.model["rotary_base"],
        vp_stage=vp_stage,
    )
    if mapped.norm_head and post_process:
        apply_norm_head(model.output_layer)
    if te and not cfg.gradient_accumulation_fusion:  # (apex absent: megatron's own layers go without)
        te_wgrad_fusion(model)
    if not cfg.use_cpu_initialization:  # on a GPU: every parameter there (megatron makes the MoE router's weight
        # and the local spec's norms without a device, i.e. on the host; Megatron-LM moves each model chunk with
        # model.cuda(torch.cuda.current_device()) in training.py's get_model)
        model.to(torch.cuda.current_device())
    return model
