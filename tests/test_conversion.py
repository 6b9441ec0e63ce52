"""HF <-> megatron conversion: bit-exact round trip, every tensor accounted for, refusals that name
the tensor or field, the exported names being exactly SGLang's, and auto_map loading."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ring.checkpoint import CheckpointMismatch, check_compatible
from megatron_ring.config import load_recipe
from megatron_ring.convert.hf_io import read_hf_state
from megatron_ring.convert.mapping import expected_hf_shapes, qkv_hf_to_mcore, qkv_mcore_to_hf

from .conftest import cli

# The parameter families SGLang's bailing_moe ``load_weights`` consumes (gate_proj/up_proj stacked into
# gate_up_proj, experts.E.{gate,up,down}_proj through the FusedMoE expert mapping); anything else it skips.
SGLANG_PATTERNS = [
    r"model\.word_embeddings\.weight", r"model\.norm\.weight", r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.attention\.(query_key_value|dense)\.weight",
    r"model\.layers\.\d+\.mlp\.gate\.weight",
    r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight",
    r"model\.layers\.\d+\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight",
]


def test_round_trip_is_bit_exact(tiny):
    a, b = read_hf_state(tiny["hf"]), read_hf_state(tiny["export"])
    assert set(a) == set(b) and len(a) == 131
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_names_are_exactly_what_sglang_reads(tiny):
    import re

    names = set(read_hf_state(tiny["export"]))
    cfg = json.loads((tiny["export"] / "config.json").read_text())
    assert names == set(expected_hf_shapes(cfg))
    unmatched = [n for n in names if not any(re.fullmatch(p, n) for p in SGLANG_PATTERNS)]
    assert unmatched == []
    assert cfg["architectures"] == ["BailingMoeForCausalLM"] and cfg["model_type"] == "bailing_moe"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_bailing_moe.BailingMoeForCausalLM"
    assert cfg["router_dtype"] == "fp32"
    for f in ("modeling_bailing_moe.py", "configuration_bailing_moe.py", "tokenizer.json", "generation_config.json"):
        assert (tiny["export"] / f).exists(), f


# The config attributes SGLang's bailing_moe model reads without a default (``config.X``; python/sglang/srt/models/
# bailing_moe.py): a missing one is an AttributeError when the server builds the model.
SGLANG_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "hidden_act", "use_bias", "use_qkv_bias", "rms_norm_eps",
                      "max_position_embeddings", "rope_theta", "rope_scaling", "embedding_dropout", "num_experts",
                      "num_experts_per_tok", "norm_topk_prob", "num_shared_experts", "moe_intermediate_size",
                      "first_k_dense_replace", "tie_word_embeddings")


def test_export_config_has_every_key_sglang_reads(tiny):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny["export"], trust_remote_code=True)
    missing = [k for k in SGLANG_CONFIG_KEYS if not hasattr(c, k)]
    assert missing == []
    assert c.hidden_act == "silu" and c.head_dim * c.num_attention_heads == 128
    assert c.rope_scaling is None or c.rope_scaling.get("rope_type") == "default"  # (transformers 5 fills it in)
    # SGLang sizes the shared expert as moe_intermediate_size * num_shared_experts: the exported tensors agree
    up = read_hf_state(tiny["export"])["model.layers.0.mlp.shared_experts.up_proj.weight"]
    assert up.shape == (c.moe_intermediate_size * c.num_shared_experts, c.hidden_size)


def test_export_loads_with_auto_model_and_matches_source(tiny):
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(tiny["hf"], trust_remote_code=True).eval()
    exp = AutoModelForCausalLM.from_pretrained(tiny["export"], trust_remote_code=True).eval()
    x = torch.randint(6, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(src(x).logits, exp(x).logits)


def test_qkv_layout_conversion_is_per_query_group():
    H, G, D, h = 4, 2, 3, 5
    w = torch.arange((H + 2 * G) * D * h, dtype=torch.float32).reshape(-1, h)
    m = qkv_hf_to_mcore(w, H, G, D)
    q, k, v = w.split([H * D, G * D, G * D])
    # megatron group 1 = [q heads 2,3 ; k head 1 ; v head 1]
    g1 = m.reshape(G, (H // G + 2) * D, h)[1]
    assert torch.equal(g1, torch.cat([q[2 * D:4 * D], k[D:2 * D], v[D:2 * D]]))
    assert torch.equal(qkv_mcore_to_hf(m, H, G, D), w)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_refused_by_name(tiny, tmp_path):
    d = _copy(tiny["hf"], tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    r = cli("convert", "hf-to-mcore", "--hf", d, "--out", tmp_path / "out", check=False)
    assert r.returncode == 1
    assert "missing 1 tensor(s): ['model.layers.2.mlp.experts.5.up_proj.weight']" in r.stderr
    assert not (tmp_path / "out").exists()


def test_extra_tensor_is_refused_by_name(tiny, tmp_path):
    d = _copy(tiny["hf"], tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.experts.8.up_proj.weight"] = sd["model.layers.0.mlp.experts.7.up_proj.weight"].clone()
    save_file(sd, d / "model.safetensors")
    r = cli("convert", "hf-to-mcore", "--hf", d, "--out", tmp_path / "out", check=False)
    assert r.returncode == 1 and "unexpected 1 tensor(s)" in r.stderr
    assert "model.layers.0.mlp.experts.8.up_proj.weight" in r.stderr


def test_changed_config_field_is_refused_naming_it(tiny, tmp_path):
    d = _copy(tiny["hf"], tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    r = cli("convert", "hf-to-mcore", "--hf", d, "--out", tmp_path / "out", check=False)
    assert r.returncode == 1
    assert "model.layers.0.mlp.experts.0.gate_proj.weight' has shape (64, 128) but config.json implies (48, 128)" in r.stderr
    assert "moe_intermediate_size" in r.stderr


def test_missing_megatron_tensor_is_refused(tiny, tmp_path):
    from megatron_ring.convert.mapping import ConversionError, hf_to_mcore, mcore_to_hf

    cfg = json.loads((tiny["hf"] / "config.json").read_text())
    mc = hf_to_mcore(read_hf_state(tiny["hf"]), cfg)
    mc.pop("decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight")
    with pytest.raises(ConversionError, match="missing tensor 'decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight'"):
        mcore_to_hf(mc, cfg)
    mc = hf_to_mcore(read_hf_state(tiny["hf"]), cfg)
    mc["decoder.layers.0.mlp.experts.local_experts.8.linear_fc2.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="no HF counterpart"):
        mcore_to_hf(mc, cfg)


def test_recipe_disagreeing_with_checkpoint_is_refused_before_training(tiny):
    check_compatible(tiny["mcore"], load_recipe("tiny").hf_config)  # the same architecture: fine
    other = dict(load_recipe("tiny").hf_config, num_experts=16)
    with pytest.raises(CheckpointMismatch, match="num_experts: 8 != 16"):
        check_compatible(tiny["mcore"], other)
    r = cli("convert", "mcore-to-hf", "--ckpt", tiny["root"] / "nope", "--out", tiny["root"] / "x", check=False)
    assert r.returncode == 1 and "config.json" in r.stderr
