"""Per-rank GPU memory of a training recipe, before anything is allocated (``megatron-ring plan``).

Terms, for the pipeline stage that needs the most:
- **weights** (bf16: 2 B/param), **gradients** (fp32 ``main_grad``: DDP reduces in fp32), **optimizer** (fp32 master
  copy + Adam m, v: 12 B/param, divided by the data-parallel size with the distributed optimizer; expert parameters
  by the expert-data-parallel size). Non-expert parameters are split by TP, experts by EP x ETP, layers by PP.
- **activations** saved for backward per micro-batch (per token and layer, divided by TP under sequence parallelism),
  x the micro-batches a 1F1B stage holds in flight (PP on the first stage); full recompute keeps only each layer's
  input plus one recomputed chunk; without Transformer Engine attention is unfused (scores saved: heads x seq).
- **logits/loss**: the vocab-parallel logits and the loss's copies on the last stage, per token x vocab/TP: SFT keeps
  megatron's fp32 softmax and gradient; the RL log-probs and entropy (``rl/logprob.py``) keep only the logits and
  their gradient, plus one chunk of fp32 temporaries.
- **reference model** (RL with KL): a second set of weights.
- **runtime**: CUDA context, NCCL buffers, allocator fragmentation (a fixed 4 GiB + 5 %).

The states and activation terms are checked against what megatron-core really allocates on the CPU
(tests/test_memory_plan.py) and against the CUDA peak on a lent GPU (scripts/gpu_check.sh).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GiB = 1024 ** 3
RUNTIME_FIXED, RUNTIME_FRACTION = 4 * GiB, 0.05


@dataclass
class Plan:
    stage: str
    gpus: int
    gpu_mem: float  # bytes
    layout: str
    tokens_per_microbatch: int
    terms: dict[str, float] = field(default_factory=dict)  # bytes per rank

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem

    def largest(self) -> str:
        return max((k for k in self.terms if k != "runtime"), key=self.terms.get)

    def table(self) -> str:
        rows = [f"plan: {self.stage} on {self.gpus} GPUs x {self.gpu_mem / GiB:.0f} GiB, {self.layout}, "
                f"{self.tokens_per_microbatch} tokens per micro-batch",
                f"  {'term':<22}{'GiB/rank':>10}"]
        rows += [f"  {k:<22}{v / GiB:>10.2f}" for k, v in self.terms.items()]
        rows.append(f"  {'total':<22}{self.total / GiB:>10.2f}   {'fits' if self.fits else 'DOES NOT FIT'} "
                    f"({self.total / self.gpu_mem:.0%} of {self.gpu_mem / GiB:.0f} GiB)")
        return "\n".join(rows)


def param_counts(hf: dict[str, Any]) -> dict[str, int]:
    """Parameters by kind: embedding, output, per-layer attention (+ norms), router, shared experts, routed
    experts (all of a layer's), dense MLP (first_k_dense_replace layers), final norm."""
    h, V = hf["hidden_size"], hf["vocab_size"]
    H = hf["num_attention_heads"]
    G = hf.get("num_key_value_heads") or H
    D = hf.get("head_dim") or h // H
    E, m = hf["num_experts"], hf["moe_intermediate_size"]
    S = int(hf.get("num_shared_experts") or 0)
    return {"embedding": V * h, "output": V * h, "attention": (H + 2 * G) * D * h + H * D * h + 2 * h,
            "router": E * h, "shared": 3 * S * m * h, "experts": E * 3 * m * h,
            "dense_mlp": 3 * hf.get("intermediate_size", 4 * h) * h, "final_norm": h}


def activation_elems_per_token(hf: dict[str, Any], flash: bool, seq: int, recompute_modules=()) -> float:
    """Elements saved for backward per token per layer (one MoE layer, no recompute)."""
    h = hf["hidden_size"]
    H = hf["num_attention_heads"]
    G = hf.get("num_key_value_heads") or H
    D = hf.get("head_dim") or h // H
    k, m, E = hf["num_experts_per_tok"], hf["moe_intermediate_size"], hf["num_experts"]
    S = int(hf.get("num_shared_experts") or 0)
    # measured on megatron-core's local layers (tests/mp/case_memory.py): norm input/output + linear_qkv input; q, k, v
    # (the unfused path expands k and v to every head); the context (linear_proj input)
    unfused = not (flash or "core_attn" in recompute_modules)
    attn = 3 * h + (H + 2 * (H if not flash else G)) * D + H * D
    attn += (H * seq + seq) if unfused else 0  # softmax probabilities (+ the mask row)
    act = 0 if "moe_act" in recompute_modules else 4 * m  # SwiGLU saves silu(gate), up, their product, fc2 input
    moe = 3 * h + k + k * h  # norm input/output, shared-expert input; routing probs; permuted tokens
    moe += k * (2 * m + act) + S * (2 * m + 4 * m)  # routed experts' fc1 output + SwiGLU; shared experts' the same
    return attn + moe


def plan(hf: dict[str, Any], recipe, stage: str, gpus: int, gpu_mem_gib: float, tokens: int, seq: int,
         flash: bool = True, microbatches: int | None = None, kl: bool = True) -> Plan:
    par, mem = recipe.parallel, recipe.memory
    tp, pp, ep, cp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                      par.expert_model_parallel_size, par.context_parallel_size)
    etp = par.resolved_etp()
    if gpus % (tp * pp * cp) or gpus % (ep * etp * pp):
        raise ValueError(f"{gpus} GPUs do not divide into TP{tp} x PP{pp} x CP{cp} and EP{ep} x ETP{etp} x PP{pp}")
    dp, edp = gpus // (tp * pp * cp), gpus // (ep * etp * pp)
    bf16 = recipe.precision.bf16 or recipe.precision.fp16
    wb = 2 if bf16 else 4
    pc = param_counts(hf)
    L, kd = hf["num_hidden_layers"], int(hf.get("first_k_dense_replace") or 0)
    per_stage = math.ceil(L / pp)
    n_moe = min(per_stage, L - kd)  # the worst stage: all its layers MoE when there are any
    dense = (pc["embedding"] + per_stage * pc["attention"] + n_moe * (pc["router"] + pc["shared"])
             + (per_stage - n_moe) * pc["dense_mlp"])
    if pp == 1:
        dense += pc["output"] + pc["final_norm"]
    dense_rank = dense / tp
    expert_rank = n_moe * pc["experts"] / (ep * etp)
    last_extra = (pc["output"] + pc["final_norm"]) / tp if pp > 1 else 0.0  # the last stage's instead of embedding
    p_rank = max(dense_rank, dense_rank - pc["embedding"] / tp + last_extra) + expert_rank
    opt_b = 12 if bf16 else 8  # (fp32 params: no separate master copy)
    shard = (lambda n, d: n / d) if mem.use_distributed_optimizer else (lambda n, d: n)
    t = {"weights": p_rank * wb, "gradients": p_rank * 4,
         "optimizer": shard(dense_rank, dp) * opt_b + shard(expert_rank, edp) * opt_b}

    tok_rank = tokens / (tp * cp)  # sequence parallel / context parallel split the tokens
    ab = wb
    mods = tuple(mem.recompute_modules or ("core_attn",)) if mem.recompute_granularity == "selective" else ()
    layer = activation_elems_per_token(hf, flash, seq // cp, mods) * tok_rank * ab
    inp = hf["hidden_size"] * tok_rank * ab  # one layer's input
    n = min(mem.recompute_num_layers or 0, per_stage)
    if mem.recompute_granularity == "full" and mem.recompute_method == "uniform":
        act = math.ceil(per_stage / n) * inp + n * layer  # chunk inputs + one chunk recomputed in backward
    elif mem.recompute_granularity == "full":  # block: the first n layers recomputed one at a time
        act = n * inp + (per_stage - n) * layer + (layer if n else 0)
    else:
        act = per_stage * layer
    in_flight = min(pp, microbatches or pp)
    t["activations"] = act * in_flight + 3 * hf["hidden_size"] * tok_rank * ab  # + final norm, output-layer input
    V = hf["vocab_size"]
    if stage == "sft":  # the logits; megatron's CE keeps an fp32 softmax, and the fp32 gradient on the way back
        t["logits/loss"] = tokens / cp * V / tp * (wb + 4 + 4)
    else:  # rl/logprob.py keeps only the logits, then their gradient; fp32 temporaries for one chunk of tokens
        from ..rl.logprob import CHUNK_TOKENS

        t["logits/loss"] = tokens / cp * V / tp * 2 * wb + min(CHUNK_TOKENS, tokens / cp) * V / tp * 4 * 4
    if stage == "rl" and kl:
        t["reference model"] = p_rank * wb
    t["runtime"] = RUNTIME_FIXED + RUNTIME_FRACTION * sum(t.values())
    layout = (f"TP{tp} PP{pp} EP{ep} ETP{etp} CP{cp} DP{dp}, recompute {mem.recompute_granularity or 'none'}, "
              f"distributed optimizer {'on' if mem.use_distributed_optimizer else 'off'}")
    return Plan(stage, gpus, gpu_mem_gib * GiB, layout, tokens, t)


def recipe_plan(recipe, hf: dict[str, Any], gpus: int, gpu_mem_gib: float, flash: bool = True,
                prompt_tokens: int = 1024, stages: dict | None = None) -> Plan:
    """The plan of a training recipe's own stage: SFT micro-batches of ``micro_batch_size`` x ``seq_length``
    tokens; RL micro-batches of ``max_tokens_per_microbatch``, or one whole sequence (prompt + max_new_tokens)
    when that is longer (a sequence is never split)."""
    stages = stages or recipe.stages
    if "sft" in stages:
        s = stages["sft"]
        seq = int(s.get("seq_length") or hf.get("max_position_embeddings", 4096))
        tokens = int(s.get("micro_batch_size", 1)) * seq
        return plan(hf, recipe, "sft", gpus, gpu_mem_gib, tokens, seq, flash)
    if "rl" in stages:
        s = stages["rl"]
        seq = prompt_tokens + int(s.get("max_new_tokens", 0))
        tokens = max(int(s.get("max_tokens_per_microbatch", seq)), seq)
        return plan(hf, recipe, "rl", gpus, gpu_mem_gib, tokens, seq, flash, kl=bool(s.get("kl_coef", 1e-3)))
    raise ValueError(f"recipe {recipe.name}: neither an sft nor an rl stage to plan")


def check_fits(recipe, hf: dict[str, Any], gpus: int, gpu_mem_bytes: float, flash: bool, stages: dict | None = None
               ) -> Plan:
    """Refuse, before anything is allocated, a recipe whose plan exceeds the GPU, naming the largest term."""
    p = recipe_plan(recipe, hf, gpus, gpu_mem_bytes / GiB, flash, stages=stages)
    if not p.fits:
        big = p.largest()
        raise MemoryError(f"recipe {recipe.name} does not fit: {p.total / GiB:.1f} GiB per rank > "
                          f"{gpu_mem_bytes / GiB:.0f} GiB; the largest term is {big} ({p.terms[big] / GiB:.1f} GiB)\n"
                          + p.table())
    return p


def check_gpu_fits(recipe, stages: dict) -> Plan | None:
    """At the start of a GPU run (after ``init_distributed``, before the model is built): the plan for this
    device's memory and world size, printed by rank 0; a recipe that cannot fit is refused (MemoryError).
    On the CPU there is nothing to check (host memory is not the device's)."""
    import torch
    import torch.distributed as dist

    from .build import use_transformer_engine

    if not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    p = check_fits(recipe, recipe.hf_config, dist.get_world_size(), total, use_transformer_engine(recipe), stages)
    if dist.get_rank() == 0:
        print(p.table(), flush=True)
    return p
