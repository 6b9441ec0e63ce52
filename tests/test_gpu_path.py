"""What the GPU path needs that can be checked on the CPU: every tensor a forward step hands the model is on
the model's device (checked with a model on the ``meta`` device: host batches that are not moved show up as
``cpu``), and every collective of ours is on a tensor that lives on the collective device (NCCL refuses CPU
tensors): scalar reductions go through ``parallel.dist.all_reduce_floats``, the others are reviewed below."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

from megatron_ring.parallel.dist import to_device
from megatron_ring.rl.policy import make_microbatches, rl_forward_step
from megatron_ring.sft.data import collate, packed_row_to_sample
from megatron_ring.training.core import lm_forward_step

PKG = Path(__file__).resolve().parents[1] / "megatron_ring"


class Recorder(torch.nn.Module):
    """Stands in for a model chunk on ``meta``: records the device of every tensor it is given."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(vocab, device="meta"))
        self.seen: list[tuple[str, torch.device]] = []

    def forward(self, tokens, position_ids, attention_mask, labels=None, packed_seq_params=None):
        for name, t in (("tokens", tokens), ("position_ids", position_ids), ("attention_mask", attention_mask),
                        ("labels", labels)):
            if t is not None:
                self.seen.append((name, t.device))
        if packed_seq_params is not None:
            self.seen += [(f"packed_seq_params.{k}", v.device) for k, v in vars(packed_seq_params).items()
                          if isinstance(v, torch.Tensor)]
        if labels is not None:
            return torch.zeros(tokens.shape, device=self.w.device)
        return torch.zeros(*tokens.shape, self.w.shape[0], device=self.w.device)


def test_sft_forward_step_moves_the_micro_batch_to_the_model():
    rows = [packed_row_to_sample([1, 2, 3, 4, 5, 6], [0, 1, 1, 0, 1, 1], [3, 3], pad_id=0)]
    model = Recorder()
    out, loss_func = lm_forward_step(iter([collate(rows)]), model)
    assert {n for n, _ in model.seen} == {"tokens", "position_ids", "attention_mask", "labels"}
    assert all(d.type == "meta" for _, d in model.seen), model.seen
    total, n, report = loss_func(out)  # the loss mask in the closure is on the model's device too
    assert total.device.type == "meta" and n.device.type == "meta"


def test_rl_forward_step_moves_the_micro_batch_to_the_model():
    seqs = [{"prompt_ids": [1, 2], "response_ids": [3, 4, 5], "adv": 1.0, "weight": 1.0, "rollout_logp": [-1.0] * 3}]
    mbs = make_microbatches(seqs, max_tokens=64)
    model = Recorder()
    cfg = {"clip_eps": 0.2, "kl_coef": 0.0, "kl_kind": "k3", "entropy_coef": 0.0, "temperature": 1.0,
           "tis_cap": None, "denominators": itertools.repeat(1.0)}
    rl_forward_step(cfg)(iter(mbs), model)
    assert {n for n, _ in model.seen} == {"tokens", "position_ids"}
    assert all(d.type == "meta" for _, d in model.seen), model.seen


def test_to_device_moves_packed_seq_params():
    from megatron.core.packed_seq_params import PackedSeqParams

    p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32),
                        cu_seqlens_kv=torch.tensor([0, 3, 6], dtype=torch.int32), max_seqlen_q=3, max_seqlen_kv=3)
    moved = to_device({"tokens": torch.zeros(1, 6), "packed_seq_params": p}, torch.device("meta"))
    assert moved["tokens"].device.type == "meta"
    assert moved["packed_seq_params"].cu_seqlens_q.device.type == "meta"
    assert moved["packed_seq_params"].max_seqlen_q == 3 and moved["packed_seq_params"].qkv_format == "thd"


# Every tensor collective in the package, by (file, function), with why its tensor is on the collective device.
# A new call site fails this test until it is reviewed and added (a Python scalar wrapped in torch.tensor(...)
# without device= lands on the CPU and NCCL refuses it on the first step).
REVIEWED = {
    ("parallel/dist.py", "all_reduce_floats"): "made with device=device()",
    ("model/norm_head.py", "normalized_head_weight"): "derived from the output layer's weight",
    ("rl/logprob.py", "forward"): "made with device=logits.device (the max and the per-token sums)",
    ("model/inference.py", "greedy_generate"): "argmax of the logits, or made with device=device()",
    ("rl/weights.py", "stream_hf_weights"): "a piece of a parameter (the parameter's device)",
    ("rl/weights.py", "_assemble"): "made on the device of rank 0's own pieces (its parameters')",
    ("rl/transport.py", "bucket"): "the assembled bucket (the parameters' device: cuda with nccl, cpu with gloo)",
    ("rl/trainer.py", "sync_weights"): "a CPU tensor on the trainer's gloo control group (self.ctrl)",
}
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce",
               "all_to_all_single", "send", "recv", "isend", "irecv"}


def _collective_sites() -> set[tuple[str, str]]:
    sites = set()
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in COLLECTIVES and ast.unparse(node.func.value) in ("dist", "torch.distributed")):
                    sites.add((str(path.relative_to(PKG)), fn.name))
    return sites


def test_every_collective_is_reviewed_for_its_device():
    sites = _collective_sites()
    assert sites, "the scan found no collective at all (it would pass anything)"
    assert sites == set(REVIEWED), f"new or removed collective call sites: {sites ^ set(REVIEWED)}"


def test_all_reduce_floats_makes_its_tensor_on_the_collective_device(monkeypatch):
    import megatron_ring.parallel.dist as d

    seen = []

    def fake_all_reduce(t, op=None, group=None):
        seen.append(t.device)
        raise StopIteration  # a meta tensor cannot be read back; the device is all this test needs

    monkeypatch.setattr(d, "device", lambda: torch.device("meta"))
    monkeypatch.setattr(d.dist, "all_reduce", fake_all_reduce)
    try:
        d.all_reduce_floats([1.0, 2.0])
    except StopIteration:
        pass
    assert seen == [torch.device("meta")]


def test_kernel_settings_on_a_te_gpu_and_on_the_cpu(monkeypatch):
    import megatron_ring.model.build as build
    from megatron_ring.config.recipe import load_recipe

    r = load_recipe("ling_lite")
    gpu = build.kernel_settings(r, te=True, cuda=True)
    # the anchors' MoE kernels by default; no apex here, so no fused wgrad (megatron would raise at construction)
    assert gpu["moe_grouped_gemm"] and gpu["moe_permute_fusion"] and gpu["apply_rope_fusion"]
    assert gpu["gradient_accumulation_fusion"] is False
    # Megatron-Bridge's Moonlight-16B settings: shared experts beside the alltoall dispatch, the fused LM loss
    # (megatron's native kernel: 0.19.2 warns against TE's), which megatron's TransformerConfig accepts with the
    # recipe's layout (its TE-only kernels left out: they need TE to validate)
    assert gpu["moe_shared_expert_overlap"] is True
    assert (gpu["cross_entropy_loss_fusion"], gpu["cross_entropy_fusion_impl"]) == (True, "native")
    monkeypatch.setattr(build, "use_transformer_engine", lambda recipe: True)
    monkeypatch.setattr(build, "kernel_settings", lambda recipe, te, cuda, _k=dict(gpu): {
        **_k, "apply_rope_fusion": False, "moe_grouped_gemm": False, "moe_permute_fusion": False,
        "masked_softmax_fusion": False, "bias_dropout_fusion": False})
    cfg = build.transformer_config(r)
    assert cfg.moe_shared_expert_overlap and cfg.cross_entropy_loss_fusion and cfg.cross_entropy_fusion_impl == "native"
    monkeypatch.undo()
    monkeypatch.setattr(build, "fused_wgrad_available", lambda: True)
    assert build.kernel_settings(r, te=True, cuda=True)["gradient_accumulation_fusion"] is True
    cpu = build.kernel_settings(r, te=False, cuda=False)
    assert not any(cpu[k] for k in ("moe_grouped_gemm", "moe_permute_fusion", "gradient_accumulation_fusion",
                                     "apply_rope_fusion", "bias_dropout_fusion"))
    r.kernels.moe_grouped_gemm = False  # a recipe's explicit choice wins
    assert build.kernel_settings(r, te=True, cuda=True)["moe_grouped_gemm"] is False
    r.kernels.moe_grouped_gemm = True
    try:
        build.kernel_settings(r, te=False, cuda=False)
        raise AssertionError("grouped GEMM without TE was accepted")
    except RuntimeError as e:
        assert "kernels.moe_grouped_gemm" in str(e)
    r.kernels.moe_grouped_gemm = None
    assert not any(cpu[k] for k in ("moe_shared_expert_overlap", "cross_entropy_loss_fusion"))
    r.parallel.moe_token_dispatcher_type = "allgather"  # megatron overlaps shared experts with alltoall/flex only
    assert build.kernel_settings(r, te=True, cuda=True)["moe_shared_expert_overlap"] is False
    r.kernels.moe_shared_expert_overlap = True
    with pytest.raises(RuntimeError, match="moe_shared_expert_overlap"):
        build.kernel_settings(r, te=True, cuda=True)
    r.kernels.moe_shared_expert_overlap = None
    r.parallel.moe_token_dispatcher_type = "alltoall"
    r.memory.recompute_granularity, r.memory.recompute_modules = "selective", ["shared_experts"]
    assert build.kernel_settings(r, te=True, cuda=True)["moe_shared_expert_overlap"] is False  # megatron refuses both
    r.memory.recompute_granularity, r.memory.recompute_modules = "full", None
    r.kernels.cross_entropy_loss_fusion = True
    with pytest.raises(RuntimeError, match="cross_entropy_loss_fusion"):
        build.kernel_settings(r, te=False, cuda=False)
    r.kernels.cross_entropy_loss_fusion = None
    r.parallel.moe_token_dispatcher_type = "flex"
    assert build.kernel_settings(r, te=True, cuda=True)["moe_flex_dispatcher_backend"] == "deepep"
    try:
        build.kernel_settings(r, te=False, cuda=False)
        raise AssertionError("flex dispatcher without TE was accepted")
    except RuntimeError as e:
        assert "flex" in str(e)


def test_te_layers_fuse_their_weight_gradient_into_main_grad_without_apex(monkeypatch):
    """Without apex, megatron's ``gradient_accumulation_fusion`` stays off (its own output layer would raise), and
    megatron hands TE the same flag: every TE linear would return a bf16 wgrad for DDP to add. ``te_wgrad_fusion``
    switches TE's own fusion on in each TE layer (TE reads ``fuse_wgrad_accumulation`` at every forward). Modelled
    with stand-ins of TE's base class (transformer_engine/pytorch/module/base.py); TE is not installed here."""
    import sys
    import types

    import megatron_ring.model.build as build

    class TransformerEngineBaseModule(torch.nn.Module):
        pass

    class Linear(TransformerEngineBaseModule):  # te.pytorch.Linear / LayerNormLinear / GroupedLinear
        def __init__(self):
            super().__init__()
            self.fuse_wgrad_accumulation = False

    class RMSNorm(TransformerEngineBaseModule):  # no weight-gradient GEMM: nothing to fuse
        pass

    class OutputLayer(torch.nn.Module):  # megatron's ColumnParallelLinear: apex or nothing
        fuse_wgrad_accumulation = False
        gradient_accumulation_fusion = False

    for name in ("transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.module"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    base = types.ModuleType("transformer_engine.pytorch.module.base")
    base.TransformerEngineBaseModule = TransformerEngineBaseModule
    monkeypatch.setitem(sys.modules, base.__name__, base)
    model = torch.nn.Sequential(Linear(), RMSNorm(), torch.nn.Sequential(Linear(), Linear()), OutputLayer())
    assert build.te_wgrad_fusion(model) == 3
    assert [m.fuse_wgrad_accumulation for m in model.modules() if isinstance(m, Linear)] == [True] * 3
    assert not hasattr(model[1], "fuse_wgrad_accumulation")
    assert model[3].fuse_wgrad_accumulation is False and model[3].gradient_accumulation_fusion is False


def test_checkpoint_keys_are_the_transformer_engine_layout(tiny, tmp_path):
    """Our checkpoints use TE's names whatever spec wrote them (megatron's TE spec: the input norm fused into
    linear_qkv; a MoE layer's own pre_mlp_layernorm; a dense layer's pre-MLP norm fused into linear_fc1), so a
    converted base model loads into a TE run and a TE-trained checkpoint exports on the CPU. TE's extra state
    (absent without TE) is tolerated on load; any other absent tensor is named."""
    from .conftest import read_json, torchrun

    out = tmp_path / "keys.json"
    torchrun("case_ckpt_keys.py", 1, "--ckpt", tiny["mcore"], "--out", out)
    got = read_json(out)
    moe = set(got["moe"])  # all layers MoE (Ling-lite): stacked keys decoder.layers.<name>
    assert {"decoder.layers.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.pre_mlp_layernorm.weight",
            "decoder.layers.mlp.router.weight"} <= moe
    assert not any("linear_fc1.layer_norm" in k or "input_layernorm" in k for k in moe), sorted(moe)
    mixed = set(got["dense"])  # first_k_dense_replace 1: layer 0 dense, 1-3 MoE; megatron numbers the layers
    assert {"decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.1.pre_mlp_layernorm.weight",
            "decoder.layers.3.pre_mlp_layernorm.weight"} <= mixed
    assert not any(k.startswith("decoder.layers.0.pre_mlp") or k.startswith("decoder.layers.1.mlp.linear_fc1.layer_norm")
                   or "input_layernorm" in k for k in mixed), sorted(mixed)
    assert got["extra_state_tolerated"] is True
    assert "decoder.layers.pre_mlp_layernorm.bogus" in got["absent_tensor_error"]


def test_fp8_pads_tokens_to_16_per_rank():
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.model.build import token_multiple

    r = load_recipe("rl_stage1_ling_lite")
    assert token_multiple(r) == 4  # TP4 + SP
    r8 = load_recipe("rl_stage1_ling_lite", {"precision": {"fp8": "hybrid"}})
    assert token_multiple(r8) == 64  # 16 tokens per rank under FP8
    seqs = [{"prompt_ids": list(range(1, 8)), "response_ids": list(range(1, 30)), "adv": 1.0, "weight": 1.0,
             "rollout_logp": [0.0] * 29}]
    (mb,) = make_microbatches(seqs, max_tokens=1024, seq_multiple=token_multiple(r8))
    assert mb["tokens"].shape[1] == 64 and (mb["tokens"].shape[1] // 4) % 16 == 0
    mx = load_recipe("rl_stage1_ling_lite", {"precision": {"fp8": "e4m3", "fp8_recipe": "mxfp8"}})
    assert token_multiple(mx) == 128  # MXFP8: 32 per rank (megatron's get_fp8_align_size)


def test_mxfp8_is_refused_below_compute_capability_10():
    """TE runs MXFP8 on Blackwell only (compute capability 10.0): an H100/H200 (9.0) recipe asking for it is
    refused before anything is built; the other FP8 recipes pass."""
    import pytest

    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.model.build import check_fp8_recipe

    mx = load_recipe("sft_distill_ling_lite", {"precision": {"fp8": "e4m3", "fp8_recipe": "mxfp8"}})
    with pytest.raises(ValueError, match="mxfp8 needs a GPU of compute capability 10.0.*this one is 9.0"):
        check_fp8_recipe(mx, (9, 0))
    check_fp8_recipe(mx, (10, 0))
    for other in ("delayed", "tensorwise", "blockwise"):
        check_fp8_recipe(load_recipe("sft_distill_ling_lite", {"precision": {"fp8": "hybrid", "fp8_recipe": other}}),
                         (9, 0))


def test_fp8_delayed_scaling_keeps_a_long_amax_history():
    """Delayed scaling with megatron's default one-step amax history lets one spiky step set the next step's scales;
    the recipes get Megatron-Bridge's settings (history 1024, max), which megatron-core's TransformerConfig takes."""
    from megatron.core.transformer import TransformerConfig

    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.model.build import fp8_settings

    delayed = fp8_settings(load_recipe("sft_distill_ling_lite", {"precision": {"fp8": "hybrid"}}).precision)
    assert (delayed["fp8_amax_history_len"], delayed["fp8_amax_compute_algo"]) == (1024, "max")
    assert delayed["moe_router_padding_for_quantization"] and not fp8_settings(load_recipe("ling_lite").precision)
    other = fp8_settings(load_recipe("ling_lite", {"precision": {"fp8": "e4m3", "fp8_recipe": "tensorwise"}}).precision)
    assert "fp8_amax_history_len" not in other
    dense = {k: v for k, v in delayed.items() if not k.startswith("moe_")}  # (MoE FP8 validation needs TE)
    c = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, **dense)
    assert (c.fp8_amax_history_len, c.fp8_amax_compute_algo, c.fp8_recipe) == (1024, "max", "delayed")


def test_fp8_primary_weights_are_gathered_by_the_distributed_optimizer():
    """megatron's distributed optimizer writes updated master weights into FP8 primary weights only under the DDP
    setting ``fp8_param_gather`` (distrib_optimizer.py: quantize_param_shard in that branch, the FP8 parameters
    skipped in the plain copy): ``fp8_param`` turns it on, and without the distributed optimizer is refused."""
    from types import SimpleNamespace

    import pytest

    from megatron_ring.training.core import ddp_config

    assert ddp_config(SimpleNamespace(fp8_param=True), True).fp8_param_gather is True
    assert ddp_config(SimpleNamespace(fp8_param=False), True).fp8_param_gather is False
    with pytest.raises(ValueError, match="fp8_param needs memory.use_distributed_optimizer"):
        ddp_config(SimpleNamespace(fp8_param=True), False)


def test_rl_thd_micro_batches_pack_sequences_without_padding_to_the_longest():
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, (p, r) in enumerate([(5, 40), (3, 4), (6, 9), (4, 3), (7, 21)]):
        seqs.append({"prompt_ids": torch.randint(1, 50, (p,), generator=g).tolist(),
                     "response_ids": torch.randint(1, 50, (r,), generator=g).tolist(), "adv": i - 2.0, "weight": 0.5,
                     "rollout_logp": torch.rand(r, generator=g).tolist(), "old_logp": torch.rand(r, generator=g).tolist()})
    dense = make_microbatches(seqs, max_tokens=64, seq_multiple=4)
    thd = make_microbatches(seqs, max_tokens=64, seq_multiple=4, thd=True)
    assert [b["tokens"].shape for b in thd] == [torch.Size([1, 64])] * 2  # 45+7+15 > 64: two rows of T=64
    assert sum(b["tokens"].numel() for b in thd) < sum(b["tokens"].numel() for b in dense)  # 128 < 5 x 48
    # every sequence's tokens and per-token fields are where its dense row has them, shifted to its segment
    flat = {k: torch.cat([b[k].reshape(-1) for b in thd]) for k in dense[0]}
    cus = [b["packed_seq_params"].cu_seqlens_q for b in thd]
    assert all(cu.dtype == torch.int32 and cu[-1] == 64 for cu in cus)
    bounds = {int(c) + 64 * i for i, cu in enumerate(cus) for c in cu}
    row = off = 0
    for j, s in enumerate(seqs):  # sequences packed in order into rows of 64; each a segment of its own
        n = len(s["prompt_ids"]) + len(s["response_ids"])
        if off + n > 64:
            row, off = row + 1, 0
        a = 64 * row + off
        assert a in bounds and a + n in bounds, (j, a, n, cus)
        d, r = dense[j // dense[0]["tokens"].shape[0]], j % dense[0]["tokens"].shape[0]
        for k in ("tokens", "labels", "loss_mask", "adv", "weight", "rollout_logp", "old_logp"):
            assert torch.equal(flat[k][a:a + n], d[k][r, :n]), (k, j)
        assert flat["position_ids"][a:a + n].tolist() == list(range(n))
        off += n
    model = Recorder()
    cfg = {"clip_eps": 0.2, "kl_coef": 0.0, "kl_kind": "k3", "entropy_coef": 0.0, "temperature": 1.0,
           "tis_cap": None, "denominators": itertools.repeat(1.0)}
    rl_forward_step(cfg)(iter(thd), model)
    assert ("packed_seq_params.cu_seqlens_q", torch.device("meta")) in model.seen  # handed to the model, moved
