"""The mapping table: a HF ``config.json`` of the Bailing MoE family -> megatron-core arguments.

One table serves Ling-lite / Ring-lite (``bailing_moe``) and Ling 2.0 / Ring-mini-2.0 (``bailing_moe_v2``).
Every field of the HF config is either mapped, checked against the one value we implement, or listed as
metadata; anything else is refused with ``not supported yet: <field>`` so that a config we would
silently mis-build can never reach training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("bailing_moe", "bailing_moe_v2")

# HF field -> TransformerConfig field (value copied as is).
DIRECT = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "head_dim": "kv_channels",
    "intermediate_size": "ffn_hidden_size",
    "num_experts": "num_moe_experts",
    "num_experts_per_tok": "moe_router_topk",
    "moe_intermediate_size": "moe_ffn_hidden_size",
    "rms_norm_eps": "layernorm_epsilon",
    "initializer_range": "init_method_std",
    "attention_dropout": "attention_dropout",
    "use_qkv_bias": "add_qkv_bias",
    # bailing_moe_v2 (Ling 2.0)
    "n_group": "moe_router_num_groups",
    "topk_group": "moe_router_group_topk",
    "routed_scaling_factor": "moe_router_topk_scaling_factor",
    "use_qk_norm": "qk_layernorm",
}

# HF field -> GPTModel constructor argument.
MODEL_ARGS = {
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_sequence_length",
    "rope_theta": "rotary_base",
    "partial_rotary_factor": "rotary_percent",
}

# Fields whose only implemented value is the one given (anything else: not supported yet).
REQUIRED_VALUES = {
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "rope_scaling": None,
    # the reference code puts a bias on attention.dense only; megatron's add_bias_linear would add one to every
    # projection (experts included), so a checkpoint with it would not convert faithfully
    "use_bias": False,
    "moe_shared_expert_gate": False,
}

# Fields of published configs that the reference modeling code never reads (so they do not change the function):
# accepted and reported once as ignored, with the reason.
IGNORED = {
    "pretraining_tp": "a tensor-parallel hint of the original training code",
    "embedding_dropout": "never read by the reference modeling code",
    "output_dropout": "never read by the reference modeling code",
    "norm_softmax": "never read by the reference modeling code",
    "output_router_logits": "an inference-time output switch",
}

# Pure metadata / inference-time switches, no effect on the math.
METADATA = {
    "model_type", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_router_logits",
    "max_window_layers", "sliding_window", "_name_or_path", "norm_softmax", "use_rmsnorm",
    "num_nextn_predict_layers_loss_weight", "mtp_loss_scaling_factor", "router_dtype",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "multi_gate", "rope_parameters", "layer_types",
    "max_seq_len", "tokenizer_class", "use_return_dict", "chunk_size_feed_forward",
    "modeling_code_transformers",
}

# Fields that must be numbers (a YAML 1.1 ``1e-06`` or a hand-edited JSON string is refused naming the field).
NUMERIC = {"num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
           "intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "rms_norm_eps",
           "initializer_range", "attention_dropout", "vocab_size", "max_position_embeddings", "rope_theta",
           "partial_rotary_factor", "num_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
           "routed_scaling_factor", "num_nextn_predict_layers"}

# Fields interpreted by code below (not a plain copy).
HANDLED = {"num_shared_experts", "first_k_dense_replace", "norm_topk_prob", "norm_head",
           "score_function", "num_nextn_predict_layers", "moe_router_enable_expert_bias"}


class ConfigNotSupported(ValueError):
    """A HF config field whose value this implementation does not build (yet)."""


@dataclass
class MappedConfig:
    """What the HF config becomes: TransformerConfig kwargs + GPTModel kwargs + our own flags."""

    model_type: str
    transformer: dict[str, Any]
    model: dict[str, Any]
    norm_head: bool
    hf: dict[str, Any] = field(repr=False)
    ignored: dict[str, str] = field(default_factory=dict)  # present fields that change nothing, with the reason

    def ignored_note(self) -> str:
        """One line listing the ignored fields (empty when there are none)."""
        if not self.ignored:
            return ""
        return "config fields ignored (no effect on the network): " + ", ".join(
            f"{k}={self.hf[k]!r} ({why})" for k, why in self.ignored.items())


def load_hf_config(path_or_dict: str | Path | dict) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    p = Path(path_or_dict)
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no HF config.json here") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None


def map_hf_config(hf: dict[str, Any]) -> MappedConfig:
    """Map a Bailing HF config onto megatron-core. Raises ``ConfigNotSupported`` naming the field."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigNotSupported(f"not supported yet: model_type={mt!r} (supported: {SUPPORTED_MODEL_TYPES})")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size"):
        if key not in hf:
            raise ConfigNotSupported(f"config.json is missing required field '{key}'")
    known = set(DIRECT) | set(MODEL_ARGS) | set(REQUIRED_VALUES) | METADATA | HANDLED | set(IGNORED)
    for key, value in hf.items():
        if key not in known:
            raise ConfigNotSupported(f"not supported yet: {key}={value!r} (unknown config field)")
        if key in NUMERIC and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigNotSupported(f"config field {key}={value!r}: expected a number, got {type(value).__name__}")
    for key, want in REQUIRED_VALUES.items():
        if key in hf and hf[key] != want and not (want is None and not hf[key]):
            raise ConfigNotSupported(f"not supported yet: {key}={hf[key]!r} (only {want!r} is implemented)")

    tc: dict[str, Any] = {DIRECT[k]: v for k, v in hf.items() if k in DIRECT and v is not None}
    tc.setdefault("kv_channels", hf["hidden_size"] // hf["num_attention_heads"])
    tc.setdefault("num_query_groups", hf["num_attention_heads"])
    tc.setdefault("ffn_hidden_size", 4 * hf["hidden_size"])
    tc.setdefault("layernorm_epsilon", 1e-5)
    tc.setdefault("attention_dropout", 0.0)  # Bailing defaults (megatron's own default is 0.1)
    tc.setdefault("hidden_dropout", 0.0)
    tc.update(normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
              moe_router_dtype="fp32")  # (grouped GEMM / permute fusion: the recipe's kernels section)
    n_shared = int(hf.get("num_shared_experts") or 0)
    if n_shared:
        tc["moe_shared_expert_intermediate_size"] = n_shared * hf["moe_intermediate_size"]
    k_dense = int(hf.get("first_k_dense_replace") or 0)
    if k_dense:
        tc["moe_layer_freq"] = [0] * k_dense + [1] * (hf["num_hidden_layers"] - k_dense)

    score = hf.get("score_function", "softmax" if mt == "bailing_moe" else "sigmoid")
    if score not in ("softmax", "sigmoid"):
        raise ConfigNotSupported(f"not supported yet: score_function={score!r}")
    tc["moe_router_score_function"] = score
    # softmax over all experts, top-k, renormalise == softmax over the top-k logits (megatron's
    # pre_softmax=False path). Without renormalisation the probabilities are taken pre-top-k.
    norm_topk = hf.get("norm_topk_prob", True)
    if score == "softmax":
        tc["moe_router_pre_softmax"] = not norm_topk
    elif not norm_topk:
        raise ConfigNotSupported("not supported yet: norm_topk_prob=False with a sigmoid router")
    if mt == "bailing_moe_v2" or hf.get("moe_router_enable_expert_bias"):
        tc["moe_router_enable_expert_bias"] = bool(hf.get("moe_router_enable_expert_bias", True))
    if hf.get("num_nextn_predict_layers"):
        tc["mtp_num_layers"] = int(hf["num_nextn_predict_layers"])
    if tc.get("moe_router_topk_scaling_factor") in (None, 1.0):
        tc.pop("moe_router_topk_scaling_factor", None)

    model = {MODEL_ARGS[k]: v for k, v in hf.items() if k in MODEL_ARGS and v is not None}
    model.setdefault("max_sequence_length", 4096)
    model.setdefault("rotary_base", 10000)
    return MappedConfig(model_type=mt, transformer=tc, model=model, norm_head=bool(hf.get("norm_head", False)),
                        hf=dict(hf), ignored={k: why for k, why in IGNORED.items() if k in hf})


# Settings that change training behaviour but not the network (and so not the checkpoint).
NON_ARCHITECTURAL = {"attention_dropout", "hidden_dropout", "init_method_std", "max_sequence_length"}
_HF_NAME = {**{v: k for k, v in DIRECT.items()}, **{v: k for k, v in MODEL_ARGS.items()},
            "moe_shared_expert_intermediate_size": "num_shared_experts", "moe_layer_freq": "first_k_dense_replace",
            "moe_router_pre_softmax": "norm_topk_prob", "moe_router_score_function": "score_function",
            "mtp_num_layers": "num_nextn_predict_layers", "norm_head": "norm_head", "model_type": "model_type"}


def architecture_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two HF configs build different networks (compared after mapping, so defaults and
    spellings do not matter); [] when a checkpoint of one loads into the other."""
    ma, mb = map_hf_config(a), map_hf_config(b)
    fa = {**ma.transformer, **ma.model, "norm_head": ma.norm_head, "model_type": ma.model_type}
    fb = {**mb.transformer, **mb.model, "norm_head": mb.norm_head, "model_type": mb.model_type}
    out = []
    for k in sorted((set(fa) | set(fb)) - NON_ARCHITECTURAL):
        if fa.get(k) != fb.get(k):
            hf = _HF_NAME.get(k, k)
            out.append(f"{hf}: {a.get(hf)!r} != {b.get(hf)!r} (megatron {k}: {fa.get(k)!r} != {fb.get(k)!r})")
    return out
