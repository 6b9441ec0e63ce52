"""Bailing MoE (Ling-lite / Ring-lite) for transformers >= 5, with a KV cache for ``generate()``.

Written for checkpoints exported by megatron-ring (the upstream remote code does not import under
transformers 5). Weight names are the upstream ones, which SGLang's ``bailing_moe`` loader reads:
``model.word_embeddings``, ``model.layers.i.attention.query_key_value`` ([Q_all; K_all; V_all]),
``.attention.dense``, ``.mlp.gate``, ``.mlp.experts.E.{gate,up,down}_proj``, ``.mlp.shared_experts.*``,
``model.norm``, ``lm_head``. The router is a softmax in fp32 over all experts, top-k, renormalised;
the output layer is a NormHead (weight normalised over the vocab dimension per hidden column).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

try:
    from .configuration_bailing_moe import BailingMoeConfig
except ImportError:  # imported as a plain module
    from configuration_bailing_moe import BailingMoeConfig

NORM_HEAD_EPS = 1e-7


_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # enable_gqa


def _cache_field(output_cls) -> str:
    """The name under which an output class carries the KV cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` before. ``generate()`` passes it back to ``forward`` under the same name."""
    return "cache" if "cache" in {f.name for f in dataclasses.fields(output_cls)} else "past_key_values"


def output_cache(out):
    """The KV cache of a model output, whatever the transformers version named it."""
    return getattr(out, _cache_field(type(out)))


def check_supported(config) -> None:
    """Refuse config values that would change the function but are not implemented here (the reference
    modeling code reads them), instead of silently computing something else."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"bailing_moe: hidden_act={act!r} is not supported (only 'silu' is implemented)")
    # transformers 5 folds rope_scaling into rope_parameters ({"rope_type": "default", "rope_theta": ...} = plain)
    for field in ("rope_scaling", "rope_parameters"):
        rope = getattr(config, field, None)
        kind = (rope.get("rope_type") or rope.get("type") or "default") if isinstance(rope, dict) else rope
        if kind not in (None, "default"):
            raise ValueError(f"bailing_moe: rope_scaling={rope!r} is not supported (only plain RoPE: rope_scaling null)")


class BailingMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class BailingMoeRotaryEmbedding(nn.Module):
    """Plain RoPE. The frequencies are computed on the fly: transformers 5 builds models on the meta
    device and leaves non-persistent buffers zero after ``from_pretrained``."""

    def __init__(self, dim, base):
        super().__init__()
        self.dim, self.base = dim, base

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=x.device).float() / self.dim))
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class BailingMoeMLP(nn.Module):
    """SwiGLU without biases (the reference code's ``use_bias`` adds a bias to ``attention.dense`` only)."""

    def __init__(self, config, intermediate_size):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BailingMoeGate(nn.Module):
    """Router: linear without bias [num_experts, hidden]; fp32 softmax; top-k; renormalised."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x):
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, self.top_k, dim=-1, sorted=True)
        if self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return topk_idx, topk_weight, logits


# A layer whose routed experts hold at most this many weights (the CPU rehearsal's tiny models) runs every expert on
# every token when no gradient is needed: a few batched matmuls over the experts' weights stacked once, instead of
# a dozen small ops per active expert (on such models the time goes to dispatching ops, not to arithmetic).
SMALL_EXPERTS = 1 << 22


class BailingMoeSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = BailingMoeGate(config)
        self.experts = nn.ModuleList(
            [BailingMoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)])
        self.shared_experts = (
            BailingMoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts else None)
        self.small = 3 * config.num_experts * config.moe_intermediate_size * config.hidden_size <= SMALL_EXPERTS
        self._stack = (None, None)  # (the weights' identity and versions, the weights side by side)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        topk_idx, topk_weight, _ = self.gate(x)
        if self.small and not torch.is_grad_enabled():
            out = self._every_expert(x, topk_idx, topk_weight)
        else:
            out = torch.zeros_like(x, dtype=torch.float32)
            order = topk_idx.flatten().argsort(stable=True)  # (token, slot) pairs grouped by expert
            counts = torch.bincount(topk_idx.flatten(), minlength=len(self.experts)).tolist()
            token, start = order // topk_idx.shape[1], 0
            for e, n in enumerate(counts):
                if n:
                    rows = order[start:start + n]
                    y = self.experts[e](x[token[start:start + n]])
                    out.index_add_(0, token[start:start + n], y.float() * topk_weight.flatten()[rows, None])
                    start += n
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)

    def _every_expert(self, x, topk_idx, topk_weight):
        """Two matmuls for all experts: gate+up of every expert side by side, then the down projections as one
        (sum_e down_e(w_e h_e) with each expert's input scaled by its routing weight, 0 where not routed)."""
        gate_up, down = self._stacked()
        E = len(self.experts)
        g, u = F.linear(x, gate_up).view(x.shape[0], E, 2, -1).unbind(2)  # [T, E, I] each
        weight = torch.zeros(x.shape[0], E, dtype=torch.float32).scatter_(1, topk_idx, topk_weight)
        h = (F.silu(g) * u).float() * weight[:, :, None]
        return F.linear(h.to(x.dtype).reshape(x.shape[0], -1), down).float()

    def _stacked(self):
        """The experts' weights side by side (gate+up [E*2I, H], down [H, E*I]), made again whenever one of them
        was replaced or written in place (a weight sync's ``copy_``; a write through ``.data`` is not seen)."""
        params = [p for e in self.experts for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._stack[0] != key:
            with torch.no_grad():
                gate_up = torch.cat([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
                down = torch.cat([e.down_proj.weight for e in self.experts], dim=1)
            self._stack = (key, (gate_up, down))
        return self._stack[1]


class BailingMoeAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv) * self.head_dim,
                                         bias=config.use_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)
        self.rotary = BailingMoeRotaryEmbedding(self.head_dim, config.rope_theta)

    def forward(self, hidden_states, position_ids, attn_bias, cache=None):
        b, s, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv * self.head_dim,
                             self.num_kv * self.head_dim], dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(v, position_ids)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.num_heads // self.num_kv
        if rep > 1 and not _SDPA_GQA:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        gqa = {"enable_gqa": True} if rep > 1 and _SDPA_GQA else {}  # (no copy of the whole cache per step)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, **gqa)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class BailingMoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = BailingMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = BailingMoeAttention(config, layer_idx)
        self.post_attention_layernorm = BailingMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = layer_idx < config.first_k_dense_replace
        self.mlp = BailingMoeMLP(config, config.intermediate_size) if dense else BailingMoeSparseMoeBlock(config)

    def forward(self, hidden_states, position_ids, attn_bias, cache=None):
        h = hidden_states + self.attention(self.input_layernorm(hidden_states), position_ids, attn_bias, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class BailingMoePreTrainedModel(PreTrainedModel):
    config_class = BailingMoeConfig
    config: BailingMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["BailingMoeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        from transformers import initialization as init

        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, BailingMoeGate):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, BailingMoeRMSNorm):
            init.ones_(module.weight)


def _attention_bias(attention_mask, q_len, past_len, dtype, device):
    """Additive mask [b, 1, q, kv]: causal (with cache offset) and key padding; finite minimum so
    fully-padded query rows stay finite."""
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos  # [q, kv]
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class BailingMoeModel(BailingMoePreTrainedModel):
    def __init__(self, config):
        check_supported(config)
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([BailingMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BailingMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        """The KV cache comes as ``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier 5.x) and is
        returned under the name the installed release's output classes declare."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache once, as cache= or past_key_values=")
        cache = cache if cache is not None else past_key_values
        h = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past_len = cache.get_seq_length() if cache is not None else 0
        q_len = h.shape[1]
        if position_ids is None:
            if attention_mask is not None:
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, past_len + q_len, device=h.device)[None].expand(h.shape[0], -1)
        attn_bias = _attention_bias(attention_mask, q_len, past_len, h.dtype, h.device)
        for layer in self.layers:
            h = layer(h, position_ids, attn_bias, cache)
        h = self.norm(h)
        return BaseModelOutputWithPast(last_hidden_state=h,
                                       **{_cache_field(BaseModelOutputWithPast): cache if use_cache else None})


class BailingMoeForCausalLM(BailingMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.model = BailingMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def head_weight(self):
        w = self.lm_head.weight
        if not self.config.norm_head:
            return w
        norm = w.detach().float().pow(2).sum(dim=0, keepdim=True).sqrt()
        return w / (norm + NORM_HEAD_EPS).to(w.dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, self.head_weight())
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_cache_field(CausalLMOutputWithPast): output_cache(out)})
