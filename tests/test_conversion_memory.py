"""Conversion of a Ling-lite-shaped model at full width (vocab 126464, hidden 2048, 64 experts top-6 + 2 shared,
FFN 1408, GQA 16/4, NormHead; one layer): HF -> megatron -> HF bit-exact with logits parity, on the CPU, with the
peak host memory of each direction measured (getrusage of the converter process) and bounded by the model in its
dtype + one layer + the process's own baseline (torch + megatron imported, a tiny conversion)."""
import resource
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT

LING_1L = {"model_type": "bailing_moe", "architectures": ["BailingMoeForCausalLM"], "vocab_size": 126464,
           "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 1, "num_attention_heads": 16,
           "num_key_value_heads": 4, "head_dim": 128, "num_experts": 64, "num_experts_per_tok": 6,
           "num_shared_experts": 2, "moe_intermediate_size": 1408, "first_k_dense_replace": 0, "norm_topk_prob": True,
           "norm_head": True, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 600000,
           "max_position_embeddings": 16384, "tie_word_embeddings": False, "use_qkv_bias": False, "use_bias": False,
           "torch_dtype": "bfloat16"}

MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")


def peak_bytes(*args) -> int:
    """Run the CLI in a fresh process; its peak resident memory in bytes."""
    r = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "megatron_ring.cli", *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ling_1l(tmp_path_factory):
    from megatron_ring.convert.hf_io import write_hf_checkpoint
    from megatron_ring.convert.mapping import expected_hf_shapes

    d = tmp_path_factory.mktemp("ling1l")
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) if len(s) > 1 else torch.ones(s, dtype=torch.bfloat16)
             for k, s in expected_hf_shapes(LING_1L).items()}
    write_hf_checkpoint(state, LING_1L, d / "hf")
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    layer_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith("model.layers.0."))
    return d, model_bytes, layer_bytes


def test_full_width_round_trip_is_bit_exact_and_streams(ling_1l, tiny, tmp_path):
    from megatron_ring.convert.hf_io import read_hf_state

    d, model_bytes, layer_bytes = ling_1l
    base = peak_bytes("convert", "hf-to-mcore", "--hf", tiny["hf"], "--out", tmp_path / "t")  # imports + a tiny model
    up = peak_bytes("convert", "hf-to-mcore", "--hf", d / "hf", "--out", tmp_path / "mcore")
    down = peak_bytes("convert", "mcore-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "hf2")
    a, b = read_hf_state(d / "hf"), read_hf_state(tmp_path / "hf2")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bf16 kept bf16, bit for bit
    assert b["lm_head.weight"].dtype == torch.bfloat16
    gib = 1024 ** 3
    print(f"model {model_bytes / gib:.2f} GiB, layer {layer_bytes / gib:.2f} GiB, baseline {base / gib:.2f} GiB; "
          f"peak hf->mcore {up / gib:.2f} GiB, mcore->hf {down / gib:.2f} GiB")
    for name, peak in (("hf->mcore", up), ("mcore->hf", down)):
        assert peak - base <= model_bytes + layer_bytes + 0.25 * gib, (name, peak, base, model_bytes, layer_bytes)
    # logits parity: megatron (the converted checkpoint, computed in fp32) vs the HF model on the same weights
    from .conftest import read_json, torchrun

    torchrun("module:megatron_ring.cli", 1, "verify", "--hf", d / "hf", "--ckpt", tmp_path / "mcore", "--out",
             tmp_path / "v.json")
    v = read_json(tmp_path / "v.json")
    print(f"logits max |megatron - HF| = {v['max_abs_diff']:.3g} (logits std {v['logits_std']:.3g})")
    assert v["ok"] and v["max_abs_diff"] <= 1e-5, v
