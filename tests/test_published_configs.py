"""The published Ring-lite / Ling-lite config.json files load as they are: shrunk only in size (layers, vocab,
hidden, experts, expert width), each goes through init -> hf-to-mcore -> verify (megatron vs HF logits) -> export ->
check-hf, its fields that change nothing are listed once as ignored, and the export keeps the config's own values
(the base model's rms_norm_eps 1e-5). A config whose rope_scaling or hidden_act we do not implement is refused by
the conversion naming the field."""
import json
from pathlib import Path

import pytest
import torch

from megatron_ring.convert.hf_io import read_hf_state

from .conftest import cli, read_json, torchrun

CONFIGS = Path(__file__).parent / "data" / "published_configs"
SHRINK = {"num_hidden_layers": 2, "vocab_size": 512, "hidden_size": 128, "num_experts": 8,
          "moe_intermediate_size": 64, "intermediate_size": 256,
          # the shrunk model's tokenizer is the tiny one (``init`` builds it): its <|endoftext|> is id 1, and the
          # export refuses a tokenizer whose eos/pad are not the config's
          "eos_token_id": 1, "pad_token_id": 1}


def _shrunk(name, d: Path, **extra) -> Path:
    cfg = json.loads((CONFIGS / name).read_text())
    cfg.update(SHRINK, **extra)
    p = d / f"{name}"
    p.write_text(json.dumps(cfg, indent=2))
    return p


@pytest.mark.parametrize("name", ["ring-lite.chat.config.json", "ling-lite.base.config.json"])
def test_published_config_goes_through_init_convert_verify_export(name, tmp_path):
    src = json.loads((CONFIGS / name).read_text())
    cfg_file = _shrunk(name, tmp_path)
    r = cli("init", "--config", cfg_file, "--out", tmp_path / "hf", "--seed", "1")
    assert r.stderr.count("config fields ignored") == 1 and "pretraining_tp=1" in r.stderr
    r = cli("convert", "hf-to-mcore", "--hf", tmp_path / "hf", "--out", tmp_path / "mcore")
    assert r.stderr.count("config fields ignored") == 1
    for f in ("pretraining_tp", "embedding_dropout", "output_dropout", "norm_softmax"):
        assert f"{f}=" in r.stderr, f
    # megatron (TP2 + SP, resharded from the TP1 conversion) vs the HF model on the same weights
    torchrun("module:megatron_ring.cli", 2, "verify", "--hf", tmp_path / "hf", "--ckpt", tmp_path / "mcore",
             "--tp", "2", "--greedy", "6", "--out", tmp_path / "v.json")
    v = read_json(tmp_path / "v.json")
    assert v["ok"] and v["max_abs_diff"] <= 1e-5 and v["logits_std"] > 0.05 and v["greedy_equal"], v
    cli("convert", "mcore-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "export",
        "--tokenizer", tmp_path / "hf")
    r = cli("check-hf", tmp_path / "export")
    assert "exactly the set SGLang's bailing_moe loader reads" in r.stdout
    a, b = read_hf_state(tmp_path / "hf"), read_hf_state(tmp_path / "export")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    out = json.loads((tmp_path / "export" / "config.json").read_text())
    assert out["rms_norm_eps"] == src["rms_norm_eps"] and isinstance(out["rms_norm_eps"], float)
    assert out["pretraining_tp"] == 1 and out["modeling_code_transformers"] == ">=5.0,<6"
    from transformers import AutoModelForCausalLM

    m0 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True, dtype=torch.float32).eval()
    x = torch.randint(0, 511, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m0(x).logits, m1(x).logits)
    assert m0.config.rms_norm_eps == src["rms_norm_eps"]


@pytest.mark.parametrize("field,value", [("rope_scaling", {"type": "linear", "factor": 4.0}),
                                         ("hidden_act", "gelu"), ("use_bias", True)])
def test_published_config_with_unimplemented_value_is_refused_naming_the_field(field, value, tmp_path):
    good = _shrunk("ring-lite.chat.config.json", tmp_path)
    cli("init", "--config", good, "--out", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    r = cli("convert", "hf-to-mcore", "--hf", tmp_path / "hf", "--out", tmp_path / "mcore", check=False)
    assert r.returncode == 1 and f"not supported yet: {field}" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "mcore").exists()
    r = cli("init", "--config", _shrunk("ring-lite.chat.config.json", tmp_path, **{field: value}),
            "--out", tmp_path / "hf2", check=False)
    assert r.returncode == 1 and field in r.stderr and not (tmp_path / "hf2").exists()
