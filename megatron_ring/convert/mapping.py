"""HF (Bailing) <-> megatron-core names and layouts, on full (unsharded) tensors.

The HF side is exactly the set of names SGLang's ``bailing_moe`` loader reads (it silently skips
unknown names, so a misspelled export would serve a random model): see ``expected_hf_shapes``.
Layout changes: the fused QKV is [Q_all; K_all; V_all] in HF and interleaved per query group in
megatron ([q_g; k_g; v_g] for each group g); megatron's SwiGLU ``linear_fc1`` is [gate; up].
"""
from __future__ import annotations

import re
from typing import Any

import torch

from ..model.hf_config import ConfigNotSupported


class ConversionError(ValueError):
    """A checkpoint that does not account for every tensor, or disagrees with its config."""


def _dims(cfg: dict[str, Any]):
    H, G = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    D = cfg.get("head_dim") or cfg["hidden_size"] // H
    return H, G, D


def check_convertible(cfg: dict[str, Any]) -> None:
    if cfg.get("model_type") != "bailing_moe":
        raise ConfigNotSupported(f"not supported yet: weight conversion for model_type={cfg.get('model_type')!r} "
                                 "(bailing_moe_v2 adds expert_bias, query/key_layernorm and MTP weights)")
    for f in ("use_qkv_bias", "use_bias"):
        if cfg.get(f):
            raise ConfigNotSupported(f"not supported yet: {f}=True in weight conversion")
    if cfg.get("tie_word_embeddings"):
        raise ConfigNotSupported("not supported yet: tie_word_embeddings=True")


def expected_hf_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name (and shape) of a Bailing v1 HF checkpoint for this config."""
    check_convertible(cfg)
    h, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, G, D = _dims(cfg)
    E, m = cfg["num_experts"], cfg["moe_intermediate_size"]
    S = int(cfg.get("num_shared_experts") or 0)
    k_dense = int(cfg.get("first_k_dense_replace") or 0)
    out: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (V, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "attention.query_key_value.weight"] = ((H + 2 * G) * D, h)
        out[p + "attention.dense.weight"] = (h, H * D)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if i < k_dense:
            f = cfg["intermediate_size"]
            out.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                        p + "mlp.down_proj.weight": (h, f)})
            continue
        out[p + "mlp.gate.weight"] = (E, h)
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": (m, h), q + "up_proj.weight": (m, h), q + "down_proj.weight": (h, m)})
        if S:
            q = p + "mlp.shared_experts."
            out.update({q + "gate_proj.weight": (S * m, h), q + "up_proj.weight": (S * m, h),
                        q + "down_proj.weight": (h, S * m)})
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (V, h)
    return out


def _qkv_rows(H: int, G: int, D: int) -> torch.Tensor:
    """For each row of megatron's fused QKV ([q_g; k_g; v_g] per query group g), its row in HF's [Q; K; V]."""
    per = H // G
    g = torch.arange(G)[:, None]
    q = (g * per * D + torch.arange(per * D)).reshape(G, -1)
    k = H * D + g * D + torch.arange(D)
    v = (H + G) * D + g * D + torch.arange(D)
    return torch.cat([q, k, v], 1).reshape(-1)


def qkv_hf_to_mcore(w: torch.Tensor, H: int, G: int, D: int) -> torch.Tensor:
    return w.index_select(0, _qkv_rows(H, G, D).to(w.device))  # one new tensor, no intermediate copies


def qkv_mcore_to_hf(w: torch.Tensor, H: int, G: int, D: int) -> torch.Tensor:
    rows = _qkv_rows(H, G, D).to(w.device)
    return w.index_select(0, torch.empty_like(rows).scatter_(0, rows, torch.arange(len(rows), device=w.device)))


# Names of the megatron *local* spec; the TE spec fuses norms into the following linear.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def hf_to_mcore(hf: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Full HF state -> full megatron state (TP1/PP1/EP1 names). Every HF tensor must be used once,
    and every expected one must be present with its expected shape."""
    verify_hf_state(hf, cfg)
    return dict(hf_to_mcore_items(hf.__getitem__, cfg))


def hf_to_mcore_items(get, cfg: dict[str, Any]):
    """(megatron name, tensor) one at a time, layer by layer; ``get(hf_name)`` reads one HF tensor."""
    H, G, D = _dims(cfg)
    yield "embedding.word_embeddings.weight", get("model.word_embeddings.weight")
    k_dense = int(cfg.get("first_k_dense_replace") or 0)
    for i in range(cfg["num_hidden_layers"]):
        p, d = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield d + "input_layernorm.weight", get(p + "input_layernorm.weight")
        yield d + "self_attention.linear_qkv.weight", qkv_hf_to_mcore(get(p + "attention.query_key_value.weight"), H, G, D)
        yield d + "self_attention.linear_proj.weight", get(p + "attention.dense.weight")
        yield d + "pre_mlp_layernorm.weight", get(p + "post_attention_layernorm.weight")
        if i < k_dense:
            yield from _mlp_items(d + "mlp.", get, p + "mlp.")
            continue
        yield d + "mlp.router.weight", get(p + "mlp.gate.weight")
        for e in range(cfg["num_experts"]):
            yield from _mlp_items(f"{d}mlp.experts.local_experts.{e}.", get, f"{p}mlp.experts.{e}.")
        if cfg.get("num_shared_experts"):
            yield from _mlp_items(d + "mlp.shared_experts.", get, p + "mlp.shared_experts.")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    yield "output_layer.weight", get("lm_head.weight")


def _mlp_items(dst, get, src):
    yield dst + "linear_fc1.weight", torch.cat([get(src + "gate_proj.weight"), get(src + "up_proj.weight")])
    yield dst + "linear_fc2.weight", get(src + "down_proj.weight")


def mcore_to_hf(mc: dict[str, torch.Tensor], cfg: dict[str, Any], consume: bool = False) -> dict[str, torch.Tensor]:
    """Full megatron state -> HF state; refuses unless every megatron tensor is consumed exactly."""
    out = dict(mcore_to_hf_items(mc, cfg, consume))
    verify_hf_state(out, cfg)
    return out


def mcore_to_hf_items(mc: dict[str, torch.Tensor], cfg: dict[str, Any], consume: bool = False):
    """(HF name, tensor) one at a time; with ``consume`` each megatron tensor leaves ``mc`` as it is converted
    (host memory stays ~ one model). Raises at the end unless every megatron tensor was used exactly once."""
    check_convertible(cfg)
    if not consume:
        mc = dict(mc)
    for k in [k for k in mc if _canonical(k) != k]:
        mc[_canonical(k)] = mc.pop(k)
    used: set[str] = set()
    for name in mcore_names(cfg):
        if name not in mc:
            raise ConversionError(f"megatron checkpoint is missing tensor '{name}'")
        used.add(name)
        yield from mcore_tensor_to_hf(name, mc.pop(name) if consume else mc[name], cfg)
    left = sorted(set(mc) - used)
    if left:
        raise ConversionError(f"{len(left)} megatron tensor(s) have no HF counterpart, e.g. {left[:5]}")


def mcore_names(cfg: dict[str, Any]) -> list[str]:
    """The full (TP1/PP1/EP1, local-spec) megatron tensor names of this config, in HF file order."""
    out = ["embedding.word_embeddings.weight"]
    k_dense = int(cfg.get("first_k_dense_replace") or 0)
    mlp = ("linear_fc1.weight", "linear_fc2.weight")
    for i in range(cfg["num_hidden_layers"]):
        d = f"decoder.layers.{i}."
        out += [d + "input_layernorm.weight", d + "self_attention.linear_qkv.weight",
                d + "self_attention.linear_proj.weight", d + "pre_mlp_layernorm.weight"]
        if i < k_dense:
            out += [d + "mlp." + m for m in mlp]
            continue
        out.append(d + "mlp.router.weight")
        out += [f"{d}mlp.experts.local_experts.{e}.{m}" for e in range(cfg["num_experts"]) for m in mlp]
        if cfg.get("num_shared_experts"):
            out += [d + "mlp.shared_experts." + m for m in mlp]
    return out + ["decoder.final_layernorm.weight", "output_layer.weight"]


_RENAMES = [(re.compile(a), b) for a, b in [
    (r"^embedding\.word_embeddings\.weight$", "model.word_embeddings.weight"),
    (r"^decoder\.final_layernorm\.weight$", "model.norm.weight"),
    (r"^output_layer\.weight$", "lm_head.weight"),
    (r"^decoder\.layers\.(\d+)\.input_layernorm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^decoder\.layers\.(\d+)\.self_attention\.linear_qkv\.weight$", r"model.layers.\1.attention.query_key_value.weight"),
    (r"^decoder\.layers\.(\d+)\.self_attention\.linear_proj\.weight$", r"model.layers.\1.attention.dense.weight"),
    (r"^decoder\.layers\.(\d+)\.pre_mlp_layernorm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^decoder\.layers\.(\d+)\.mlp\.router\.weight$", r"model.layers.\1.mlp.gate.weight"),
    (r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.linear_fc(\d)\.weight$", r"model.layers.\1.mlp.experts.\2.fc\3"),
    (r"^decoder\.layers\.(\d+)\.mlp\.shared_experts\.linear_fc(\d)\.weight$", r"model.layers.\1.mlp.shared_experts.fc\2"),
    (r"^decoder\.layers\.(\d+)\.mlp\.linear_fc(\d)\.weight$", r"model.layers.\1.mlp.fc\2"),
]]


def mcore_tensor_to_hf(name: str, t: torch.Tensor, cfg: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """One full megatron tensor (canonical name) -> its HF tensor(s): the QKV regrouped, SwiGLU's fc1 split in
    gate and up; every other tensor is renamed only (the same storage)."""
    name = _canonical(name)
    for pat, rep in _RENAMES:
        if pat.match(name):
            hf = pat.sub(rep, name)
            break
    else:
        raise ConversionError(f"megatron tensor '{name}' has no HF counterpart")
    if hf.endswith(".query_key_value.weight"):
        return [(hf, qkv_mcore_to_hf(t, *_dims(cfg)))]
    if hf.endswith(".fc1"):
        gate, up = t.chunk(2)
        return [(hf[:-3] + "gate_proj.weight", gate.contiguous()), (hf[:-3] + "up_proj.weight", up.contiguous())]
    if hf.endswith(".fc2"):
        return [(hf[:-3] + "down_proj.weight", t)]
    return [(hf, t)]


def _canonical(name: str) -> str:
    for te, local in TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def verify_hf_state(hf: dict[str, torch.Tensor], cfg: dict[str, Any]) -> None:
    """Every expected tensor present with the shape the config implies; nothing unexpected."""
    verify_hf_shapes({k: tuple(v.shape) for k, v in hf.items()}, cfg)


def verify_hf_shapes(hf: dict[str, tuple[int, ...]], cfg: dict[str, Any]) -> None:
    """``verify_hf_state`` on names and shapes only (a safetensors header is enough)."""
    want = expected_hf_shapes(cfg)
    missing = sorted(set(want) - set(hf), key=_natural)
    unexpected = sorted(set(hf) - set(want), key=_natural)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {missing[:8]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s) not implied by config.json: {unexpected[:8]}")
    for name in sorted(set(want) & set(hf), key=_natural):
        if tuple(hf[name]) != want[name]:
            problems.append(f"tensor '{name}' has shape {tuple(hf[name])} but config.json implies "
                            f"{want[name]} ({_fields_for(name)})")
            if len(problems) > 8:
                break
    if problems:
        raise ConversionError("checkpoint does not match its config: " + "; ".join(problems))


def _fields_for(name: str) -> str:
    if "query_key_value" in name:
        return "num_attention_heads, num_key_value_heads, head_dim, hidden_size"
    if "experts" in name and "shared" not in name:
        return "moe_intermediate_size, hidden_size"
    if "shared_experts" in name:
        return "num_shared_experts, moe_intermediate_size, hidden_size"
    if "gate.weight" in name:
        return "num_experts, hidden_size"
    if "word_embeddings" in name or "lm_head" in name:
        return "vocab_size, hidden_size"
    return "hidden_size"


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
