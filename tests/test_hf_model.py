"""The HF model code for exported checkpoints (transformers >= 5): cache, NormHead, router."""
import torch

from megatron_ring.config import load_recipe
from megatron_ring.hf.configuration_bailing_moe import BailingMoeConfig
from megatron_ring.hf.modeling_bailing_moe import BailingMoeForCausalLM


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return BailingMoeForCausalLM(BailingMoeConfig(**dict(load_recipe("tiny").hf_config, **over))).eval()


def test_kv_cache_matches_full_forward():
    m = _model()
    x = torch.randint(6, 512, (2, 20))
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        a = m(x[:, :12])
        b = m(x[:, 12:], past_key_values=a.past_key_values)
    assert (torch.cat([a.logits, b.logits], 1) - full).abs().max() < 1e-5


def test_generate_greedy_equals_argmax_loop():
    m = _model(1)
    x = torch.randint(6, 512, (1, 5))
    with torch.no_grad():
        g = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                       min_new_tokens=6, pad_token_id=1)
        seq = x
        for _ in range(6):
            seq = torch.cat([seq, m(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(g, seq)


def test_left_padding_gives_same_logits():
    m = _model(2)
    x = torch.randint(6, 512, (1, 8))
    padded = torch.cat([torch.ones(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = m(x, use_cache=False).logits
        out = m(padded, attention_mask=mask, use_cache=False).logits[:, 3:]
    assert (out - ref).abs().max() < 1e-5


def test_norm_head_is_invariant_to_column_scale():
    """logits = h · (W / ||W||_vocab)^T: scaling a hidden column of lm_head changes nothing."""
    m = _model(3)
    x = torch.randint(6, 512, (1, 10))
    with torch.no_grad():
        ref = m(x, use_cache=False).logits
        m.lm_head.weight[:, 5] *= 7.0
        out = m(x, use_cache=False).logits
        m.config.norm_head = False
        plain = m(x, use_cache=False).logits
    assert (out - ref).abs().max() < 1e-5
    assert (plain - ref).abs().max() > 1e-2


def test_router_renormalises_top_k_in_fp32():
    m = _model(4)
    gate = m.model.layers[0].mlp.gate
    h = torch.randn(7, 128)
    idx, w, logits = gate(h)
    assert logits.dtype == torch.float32 and w.shape == (7, 2)
    assert torch.allclose(w.sum(-1), torch.ones(7))
    assert torch.equal(idx, logits.topk(2, dim=-1).indices)


def _argmax_loop(m, ids, n):
    """Greedy decoding without any cache: the whole sequence through the model for every token."""
    seq = ids
    for _ in range(n):
        seq = torch.cat([seq, m(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return seq


def test_generate_batched_left_padded_equals_argmax_loop():
    """generate() with its KV cache (under whatever name the installed transformers passes it: ``cache`` from
    5.24 on, ``past_key_values`` before) equals a no-cache argmax loop per prompt, also left-padded in a batch.
    A model that misses the cache argument decodes each step from its newest token alone and fails here."""
    m = _model(5)
    a, b = torch.randint(6, 512, (1, 9)), torch.randint(6, 512, (1, 4))
    ids = torch.cat([a, torch.cat([torch.ones(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        g = m.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=1)
        ref_a, ref_b = _argmax_loop(m, a, 8), _argmax_loop(m, b, 8)
    assert torch.equal(g[0], ref_a[0])
    assert torch.equal(g[1, 5:], ref_b[0])


def test_cache_is_accepted_and_returned_under_both_names():
    from megatron_ring.hf.modeling_bailing_moe import output_cache

    m = _model(6)
    x = torch.randint(6, 512, (2, 10))
    with torch.no_grad():
        full = m(x, use_cache=False).logits[:, 6:]
        first = m(x[:, :6])
        assert output_cache(first).get_seq_length() == 6
        new = m(x[:, 6:], cache=output_cache(first)).logits
        old = m(x[:, 6:], past_key_values=output_cache(m(x[:, :6]))).logits
    assert (new - full).abs().max() < 1e-5 and (old - full).abs().max() < 1e-5


def test_unimplemented_config_values_are_refused_naming_the_field():
    import pytest

    for over, field in (({"hidden_act": "gelu"}, "hidden_act"),
                        ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "rope_scaling"),
                        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling")):
        with pytest.raises(ValueError, match=field):
            _model(0, **over)
    _model(0, rope_scaling=None)  # the published configs' value


def test_use_bias_puts_a_bias_on_attention_dense_only():
    """The reference modeling code: ``use_bias`` -> attention.dense; MLPs and experts never have a bias."""
    m = _model(7, use_bias=True)
    with_bias = sorted({n.split(".", 3)[-1] for n, _ in m.named_parameters() if n.endswith(".bias")})
    assert with_bias == ["attention.dense.bias"]


def test_moe_block_equals_the_per_token_formula_on_both_paths_and_follows_weight_updates():
    """out[t] = sum_k w[t,k] * expert_idx[t,k](x[t]) + shared(x[t]): the tiny models' every-expert path (inference)
    and the grouped path (with gradients, and every model above ``SMALL_EXPERTS``) both compute it; the every-expert
    path's stacked weights follow a weight update written in place (a weight sync's ``copy_``) or a replaced
    parameter."""
    m = _model(5)
    blk = m.model.layers[1].mlp
    assert blk.small
    x = torch.randn(2, 9, 128)

    def formula(x):
        flat = x.reshape(-1, 128)
        idx, w, _ = blk.gate(flat)
        out = torch.stack([sum(w[t, k] * blk.experts[int(idx[t, k])](flat[t]) for k in range(2))
                           for t in range(len(flat))])
        return (out + blk.shared_experts(flat)).reshape(x.shape)

    with torch.no_grad():
        ref = formula(x)
        assert len(blk.gate(x.reshape(-1, 128))[0].unique()) >= 6  # most experts are routed to
        every = blk(x)
    grouped = blk(x)  # (gradients on: the grouped path)
    assert grouped.requires_grad
    assert (every - ref).abs().max() < 1e-5 and (grouped.detach() - ref).abs().max() < 1e-5
    with torch.inference_mode():
        for e in (2, 5):
            blk.experts[e].down_proj.weight.copy_(torch.randn(128, 64))
        assert (blk(x) - formula(x)).abs().max() < 1e-5
    blk.experts[0].gate_proj.weight = torch.nn.Parameter(torch.randn(64, 128))
    with torch.no_grad():
        assert (blk(x) - formula(x)).abs().max() < 1e-5
