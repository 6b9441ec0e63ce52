"""The HF config -> megatron mapping table, recipes, and the refusal of what is not implemented."""
import math

import pytest

from megatron_ring.config import load_recipe
from megatron_ring.config.recipe import list_recipes
from megatron_ring.convert.mapping import expected_hf_shapes
from megatron_ring.model.hf_config import ConfigNotSupported, architecture_diff, map_hf_config

LING_V2 = {  # the shape of a Ling 2.0 / Ring-mini-2.0 config
    "model_type": "bailing_moe_v2", "vocab_size": 157184, "hidden_size": 2048, "intermediate_size": 5120,
    "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "moe_intermediate_size": 512,
    "first_k_dense_replace": 1, "score_function": "sigmoid", "moe_router_enable_expert_bias": True,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "use_qk_norm": True,
    "partial_rotary_factor": 0.5, "rope_theta": 10000, "norm_topk_prob": True, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
}


def test_recipes_ship_tiny_and_ling_lite():
    assert {"tiny", "ling_lite"} <= set(list_recipes())
    r = load_recipe("ling_lite")
    assert r.parallel.expert_model_parallel_size == 8 and r.precision.bf16
    assert r.moe.moe_aux_loss_coeff == 1e-5 and r.moe.moe_z_loss_coeff == 1e-7


def test_ling_lite_maps_exactly():
    m = map_hf_config(load_recipe("ling_lite").hf_config)
    t = m.transformer
    assert t["num_layers"] == 28 and t["hidden_size"] == 2048 and t["num_attention_heads"] == 16
    assert t["num_query_groups"] == 4 and t["kv_channels"] == 128
    assert t["num_moe_experts"] == 64 and t["moe_router_topk"] == 6 and t["moe_ffn_hidden_size"] == 1408
    assert t["moe_shared_expert_intermediate_size"] == 2816  # 2 shared experts x 1408
    assert t["moe_router_score_function"] == "softmax" and t["moe_router_pre_softmax"] is False  # renormalised top-k
    assert t["moe_router_dtype"] == "fp32" and t["normalization"] == "RMSNorm" and t["gated_linear_unit"]
    assert t["layernorm_epsilon"] == 1e-6 and t["add_bias_linear"] is False
    assert t["attention_dropout"] == 0.0 and t["hidden_dropout"] == 0.0
    assert "moe_layer_freq" not in t  # all 28 layers are MoE
    assert m.model == {"vocab_size": 126464, "max_sequence_length": 16384, "rotary_base": 600000}
    assert m.norm_head is True


def test_ling_lite_parameter_counts_match_the_paper():
    """16.8B total / 2.75B active, counted from the tensors the mapping implies."""
    cfg = load_recipe("ling_lite").hf_config
    shapes = expected_hf_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    expert = sum(math.prod(s) for n, s in shapes.items() if ".mlp.experts." in n)
    active = total - expert + expert * cfg["num_experts_per_tok"] / cfg["num_experts"]
    assert abs(total / 1e9 - 16.80) < 0.01, total
    assert abs(active / 1e9 - 2.75) < 0.01, active
    assert len([n for n in shapes if ".mlp.experts." in n]) == 28 * 64 * 3


def test_tiny_has_the_same_structure():
    t = map_hf_config(load_recipe("tiny").hf_config)
    tr = t.transformer
    assert tr["num_moe_experts"] > tr["moe_router_topk"] > 1
    assert tr["moe_shared_expert_intermediate_size"] > 0 and t.norm_head
    assert tr["num_query_groups"] < tr["num_attention_heads"]  # GQA
    n = sum(math.prod(s) for s in expected_hf_shapes(load_recipe("tiny").hf_config).values())
    assert 0.5e6 < n < 3e6  # a few MB in fp32


def test_v2_maps_extra_fields():
    t = map_hf_config(LING_V2).transformer
    assert t["moe_router_score_function"] == "sigmoid" and t["moe_router_enable_expert_bias"] is True
    assert t["moe_router_num_groups"] == 8 and t["moe_router_group_topk"] == 4
    assert t["moe_router_topk_scaling_factor"] == 2.5 and t["qk_layernorm"] is True
    assert t["moe_layer_freq"] == [0] + [1] * 19
    assert map_hf_config(LING_V2).model["rotary_percent"] == 0.5


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("rope_scaling", {"type": "yarn"}),
                                         ("tie_word_embeddings", True), ("moe_fancy_new_thing", 3)])
def test_unsupported_fields_are_refused_by_name(field, value):
    cfg = dict(load_recipe("tiny").hf_config, **{field: value})
    with pytest.raises(ConfigNotSupported, match=f"not supported yet: {field}"):
        map_hf_config(cfg)


def test_v2_weight_conversion_is_refused_clearly():
    with pytest.raises(ConfigNotSupported, match="not supported yet: weight conversion for model_type='bailing_moe_v2'"):
        expected_hf_shapes(LING_V2)


def test_architecture_diff_names_fields():
    a = load_recipe("tiny").hf_config
    # spellings and non-architectural fields do not matter: head_dim left to its default (hidden / heads = 32)
    same = {k: v for k, v in a.items() if k != "head_dim"}
    assert a["head_dim"] == a["hidden_size"] // a["num_attention_heads"]
    assert architecture_diff(a, dict(same, auto_map={}, torch_dtype="float32", initializer_range=0.1)) == []
    assert [d.split(":")[0] for d in architecture_diff(a, dict(a, head_dim=64))] == ["head_dim"]
    diff = architecture_diff(a, dict(a, num_experts=6))
    assert len(diff) == 1 and diff[0].startswith("num_experts: 8 != 6")


def test_transformer_config_builds_for_ling_lite():
    from megatron_ring.model.build import transformer_config

    cfg = transformer_config(load_recipe("ling_lite", {"precision": {"bf16": False}}))
    assert cfg.num_moe_experts == 64 and cfg.expert_model_parallel_size == 8
    assert cfg.moe_aux_loss_coeff == 1e-5 and cfg.moe_z_loss_coeff == 1e-7


def test_fp8_without_transformer_engine_is_a_clear_error():
    from megatron_ring.model.build import transformer_config

    r = load_recipe("tiny", {"precision": {"fp8": "hybrid"}})
    with pytest.raises(RuntimeError, match="fp8.*Transformer Engine"):
        transformer_config(r)


def test_memory_section_is_checked_when_the_recipe_is_read(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("base: tiny\nmemory:\n  recompute_granularity: full\n")
    with pytest.raises(ValueError, match="recompute_method"):
        load_recipe(p)
    p.write_text("base: tiny\nmemory:\n  recompute_granularity: selective\n  recompute_num_layers: 2\n")
    with pytest.raises(ValueError, match="full only"):
        load_recipe(p)


def test_recipe_yaml_errors_name_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base: tiny\nparallel:\n  tensor_parallel: 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml.parallel: unknown key\(s\) \['tensor_parallel'\]"):
        load_recipe(p)
    p.write_text("base: tiny\nparallel:\n  tensor_model_parallel_size: two\n")
    with pytest.raises(TypeError, match="tensor_model_parallel_size: expected int"):
        load_recipe(p)
    p.write_text("base: tiny\nparallel:\n  moe_token_dispatcher_type: deepep\n")
    with pytest.raises(ValueError, match="'deepep' is not one of"):
        load_recipe(p)
    p.write_text("base: tiny\nparallel:\n  expert_model_parallel_size: 2\n")
    r = load_recipe(p)
    assert r.parallel.expert_model_parallel_size == 2 and r.parallel.resolved_etp() == 1
    assert r.hf_config["num_experts"] == 8  # inherited from the base recipe


def test_published_configs_map_with_their_inert_fields_ignored():
    import json
    from pathlib import Path

    d = Path(__file__).parent / "data" / "published_configs"
    chat = json.loads((d / "ring-lite.chat.config.json").read_text())
    base = json.loads((d / "ling-lite.base.config.json").read_text())
    mc, mb = map_hf_config(chat), map_hf_config(base)
    assert set(mb.ignored) == {"pretraining_tp", "embedding_dropout", "output_dropout", "norm_softmax",
                               "output_router_logits"}
    assert mb.ignored_note().count("pretraining_tp=1") == 1
    # the base model's dropouts 0.1 are never read by the reference code: no megatron dropout either
    assert mb.transformer["hidden_dropout"] == 0.0 and mb.transformer["layernorm_epsilon"] == 1e-5
    assert mc.transformer["layernorm_epsilon"] == 1e-6 and mc.transformer["add_bias_linear"] is False
    # the published chat config is the ling_lite recipe's architecture
    assert architecture_diff(chat, load_recipe("ling_lite").hf_config) == []
    assert architecture_diff(base, chat) == ["rms_norm_eps: 1e-05 != 1e-06 (megatron layernorm_epsilon: 1e-05 != 1e-06)"]


def test_numbers_must_be_numbers():
    cfg = dict(load_recipe("tiny").hf_config, rms_norm_eps="1e-06")
    with pytest.raises(ConfigNotSupported, match="rms_norm_eps='1e-06': expected a number, got str"):
        map_hf_config(cfg)


def test_yaml_recipe_numbers_stay_numbers(tmp_path):
    """YAML 1.1 reads ``1e-06`` as a string; recipes use YAML 1.2 floats, and a non-number is refused on load."""
    p = tmp_path / "r.yaml"
    p.write_text("base: tiny\nhf_config:\n  rms_norm_eps: 1e-06\n  rope_theta: 6e5\nmoe:\n  moe_aux_loss_coeff: 1e-5\n")
    r = load_recipe(p)
    assert r.hf_config["rms_norm_eps"] == 1e-6 and isinstance(r.hf_config["rms_norm_eps"], float)
    assert r.hf_config["rope_theta"] == 600000.0 and r.moe.moe_aux_loss_coeff == 1e-5
    p.write_text("base: tiny\nhf_config:\n  rms_norm_eps: 1e-6x\n")
    with pytest.raises(ValueError, match=r"r.yaml: hf_config: .*rms_norm_eps='1e-6x': expected a number"):
        load_recipe(p)


def test_training_recipes_take_the_architecture_from_the_checkpoint():
    for name in list_recipes():
        if name.startswith(("sft_", "rl_")):
            assert load_recipe(name).hf_config is None, name
