"""The device check (scripts/gpu_check.sh): megatron-core's CUDA path of this project on one GPU, in one process
(an NCCL world of 1: a CPU tensor in a collective fails as it would at scale), printing one table.

1. tiny recipe: an SFT step and an RL (C3PO) step, bf16; the resume path (distributed optimizer, MoE alltoall
   dispatcher: two SFT steps, a training checkpoint, two more; a fresh model and optimizer from the checkpoint give
   the same losses).
2. a Ling-lite-shaped model at full width (vocab 126464, hidden 2048, 64 experts top-6 + 2 shared, FFN 1408,
   GQA 16/4, NormHead) with few layers: HF -> megatron conversion on the CPU (peak host memory), logits of the
   megatron model on the GPU (fp32) vs the HF model on the CPU, bf16 SFT and RL steps: loss, tokens/s, model-FLOPs
   utilisation against the chip's 790 TFLOP/s bf16, and peak GPU memory against ``megatron-ring plan``.

``--dry-run``: the same code on the CPU (fp32) with the tiny model and a narrow Ling-shaped one, few tokens.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16 = 790e12  # the H200's measured dense bf16 matmul rate (FLOP/s)
LING = {"model_type": "bailing_moe", "architectures": ["BailingMoeForCausalLM"], "vocab_size": 126464,
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 2, "num_attention_heads": 16,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 64, "num_experts_per_tok": 6, "num_shared_experts": 2,
        "moe_intermediate_size": 1408, "first_k_dense_replace": 0, "norm_topk_prob": True, "norm_head": True,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 600000, "max_position_embeddings": 16384,
        "tie_word_embeddings": False, "use_qkv_bias": False, "use_bias": False, "pad_token_id": 0}
NARROW = {"vocab_size": 4096, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64,
          "moe_intermediate_size": 128, "num_hidden_layers": 1}
ROWS: list[tuple[str, str, str]] = []


def row(check: str, result: str, ok: bool | None = True) -> None:
    ROWS.append((check, result, "ok" if ok else ("-" if ok is None else "FAIL")))
    print(f"[gpu_check] {check}: {result} {'' if ok is None else ('ok' if ok else 'FAIL')}", flush=True)


def cli_peak(*args) -> int:
    """``megatron-ring ARGS`` in a fresh process; its peak resident memory (bytes)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "megatron_ring.cli", *map(str, args)],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"megatron-ring {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return int(r.stdout.strip().splitlines()[-1])


def flops_per_token(hf: dict, seq: int) -> float:
    """Training FLOPs per token: 6 x active parameters (embedding lookup excluded) + attention scores/context."""
    from megatron_ring.model.memory import param_counts

    pc = param_counts(hf)
    k, E = hf["num_experts_per_tok"], hf["num_experts"]
    active = hf["num_hidden_layers"] * (pc["attention"] + pc["router"] + pc["shared"] + pc["experts"] * k / E)
    attn = 12 * hf["num_hidden_layers"] * seq * hf["num_attention_heads"] * (hf.get("head_dim") or 128) / 2  # causal
    return 6 * (active + pc["output"]) + attn


def sft_microbatches(V: int, seq: int, n_mb: int, g: torch.Generator) -> list:
    """Packed rows of two conversations each, built on the host (the trainer's path)."""
    from megatron_ring.sft.data import collate, packed_row_to_sample

    return [collate([packed_row_to_sample(torch.randint(3, V, (seq,), generator=g).tolist(), [1] * seq,
                                          [seq // 3, seq - seq // 3], pad_id=0)]) for _ in range(n_mb)]


def resume_check(recipe, ckpt: Path, seq: int, out: Path) -> dict:
    """The shipped resume path: the distributed optimizer (TE's FusedAdam where TE is installed), two SFT steps, a
    training checkpoint (model + optimizer state by parameter key, as the trainers write it), two more steps; then
    a fresh model and optimizer loaded from that checkpoint take the same two steps. The 4th loss depends on the
    3rd update, i.e. on the restored Adam moments and step count."""
    from megatron_ring.checkpoint import load_checkpoint, save_checkpoint
    from megatron_ring.model.build import build_model
    from megatron_ring.optim_state import adam_step
    from megatron_ring.training.core import OptimConfig, build_optimizer, train_step, wrap_ddp

    mbs = sft_microbatches(recipe.hf_config["vocab_size"], seq, 2, torch.Generator().manual_seed(1))

    def fresh(start: Path, with_optimizer: bool):
        model = build_model(recipe)
        ddp = wrap_ddp(model, use_distributed_optimizer=True)
        opt = build_optimizer([ddp], OptimConfig(lr=1e-4, use_distributed_optimizer=True))
        load_checkpoint(model, start, recipe.hf_config, optimizer=opt if with_optimizer else None)
        return model, ddp, opt

    def steps(ddp, opt, n):
        return [train_step([ddp], opt, list(mbs), len(mbs), seq, 1)["loss"] for _ in range(n)]

    model, ddp, opt = fresh(ckpt, False)
    steps(ddp, opt, 2)
    save_checkpoint(model, out / "resume_ckpt", recipe.hf_config, iteration=2, parallel=recipe.parallel.sizes(),
                    optimizer=opt)
    saved_step = adam_step(opt)
    whole = steps(ddp, opt, 2)
    del model, ddp, opt
    model, ddp, opt = fresh(out / "resume_ckpt", True)
    resumed_step = adam_step(opt)
    again = steps(ddp, opt, 2)
    return {"whole": whole, "resumed": again, "adam_step": (saved_step, resumed_step),
            "optimizer": type(getattr(opt, "chained_optimizers", [opt])[0].optimizer).__name__,
            "devices": sorted({p.device.type for p in model.parameters()})}


def train(recipe, ckpt: Path, kind: str, seq: int, n_mb: int, steps: int, dev: torch.device) -> dict:
    """``steps`` optimizer steps (the first one warms up) of an SFT or RL micro-batch stream on ``dev``."""
    from megatron_ring.checkpoint import load_checkpoint
    from megatron_ring.model.build import build_model
    from megatron_ring.rl.policy import make_microbatches, rl_forward_step, score_logprobs
    from megatron_ring.rl.trainer import REPORT
    from megatron_ring.training.core import OptimConfig, build_optimizer, train_step, wrap_ddp

    model = build_model(recipe)
    load_checkpoint(model, ckpt, recipe.hf_config)
    ddp = wrap_ddp(model)
    opt = build_optimizer([ddp], OptimConfig(lr=1e-5))
    V = recipe.hf_config["vocab_size"]
    g = torch.Generator().manual_seed(0)
    if kind == "sft":
        mbs, keys = sft_microbatches(V, seq, n_mb, g), ("lm loss",)
    else:  # rollouts with mixed advantages and an old policy that differs from the current one (ratios clip)
        seqs = [{"prompt_ids": torch.randint(3, V, (seq // 4,), generator=g).tolist(),
                 "response_ids": torch.randint(3, V, (seq - seq // 4,), generator=g).tolist(),
                 "adv": (-1.0) ** i, "weight": 1.0, "rollout_logp": [-2.0] * (seq - seq // 4)} for i in range(n_mb)]
        mbs = make_microbatches(seqs, max_tokens=seq, seq_multiple=1)
        for b, lp in zip(mbs, score_logprobs(model, mbs)):  # π_old (a forward-only pass on the device)
            b["old_logp"] = lp.cpu() + 0.3 * torch.randn(lp.shape, generator=g)
        keys = REPORT
    times, out = [], {}
    for i in range(steps):
        if i == 1 and dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step_kw = {} if kind == "sft" else {"forward_step": rl_forward_step(
            {"clip_eps": 0.2, "kl_coef": 0.0, "kl_kind": "k3", "entropy_coef": 5e-4, "temperature": 1.0, "tis_cap": None,
             "denominators": iter([float(seq * n_mb)] + [0.0] * (len(mbs) - 1))})}
        out = train_step([ddp], opt, list(mbs), len(mbs), seq, 1, report_keys=keys, **step_kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = sum(times[1:]) / max(len(times) - 1, 1)
    out["tokens_per_s"] = seq * len(mbs) / dt
    out["peak_bytes"] = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    out["devices"] = sorted({p.device.type for p in model.parameters()})
    del ddp, opt, model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="the same path on the CPU, tiny sizes")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"))
    a = ap.parse_args()
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.convert.hf_io import write_hf_checkpoint
    from megatron_ring.convert.mapping import expected_hf_shapes
    from megatron_ring.model.memory import GiB, plan
    from megatron_ring.parallel.dist import device, init_distributed

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    prec = {"bf16": not dry, "transformer_impl": "local"}  # (no TE on the device machine)
    tiny = load_recipe("tiny", {"precision": prec})
    # conversions first: they run in their own processes on the CPU, before this one touches CUDA
    cli_peak("init", "--recipe", "tiny", "--out", out / "tiny_hf", "--seed", "1")
    cli_peak("convert", "hf-to-mcore", "--hf", out / "tiny_hf", "--out", out / "tiny_mcore")
    ling = dict(LING, **(NARROW if dry else {}))
    shapes = expected_hf_shapes(ling)
    g = torch.Generator().manual_seed(0)
    dt = torch.float32 if dry else torch.bfloat16
    write_hf_checkpoint({k: ((torch.randn(s, generator=g) * 0.02) if len(s) > 1 else torch.ones(s)).to(dt)
                         for k, s in shapes.items()}, ling, out / "ling_hf")
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    peak = cli_peak("convert", "hf-to-mcore", "--hf", out / "ling_hf", "--out", out / "ling_mcore")
    model_b = n_params * (4 if dry else 2)
    row("convert Ling-shaped HF->mcore (CPU)", f"{n_params / 1e9:.2f}B params, peak host {peak / GiB:.2f} GiB "
        f"for a {model_b / GiB:.2f} GiB model", peak < 2 * model_b + 2 * GiB)

    init_distributed(tiny.parallel, seed=1)
    dev = device()
    row("device", f"{dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU dry run'}), "
        f"torch {torch.__version__}", None)
    seq_t = 64 if dry else 1024
    for kind in ("sft", "rl"):
        r = train(tiny, out / "tiny_mcore", kind, seq_t, 2, 3, dev)
        loss = r.get("loss", r.get("pg_loss"))
        row(f"tiny {kind} step", f"loss {loss:.4f}, grad norm {r['grad_norm']:.3g}, params on {r['devices']}",
            torch.isfinite(torch.tensor([loss, r["grad_norm"]])).all().item() and r["devices"] == [dev.type])

    r = resume_check(tiny, out / "tiny_mcore", seq_t, out)
    same = all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(r["whole"], r["resumed"]))
    row("tiny SFT resume (distributed optimizer, 2 steps, save, 2 more)",
        f"4th loss {r['whole'][1]:.6f} uninterrupted vs {r['resumed'][1]:.6f} resumed, Adam step "
        f"{r['adam_step'][0]} saved / {r['adam_step'][1]} restored ({r['optimizer']}), params on {r['devices']}",
        same and r["adam_step"] == (2, 2) and r["devices"] == [dev.type])

    # logits parity: megatron on the device (fp32) vs the HF reference on the CPU (fp32)
    from transformers import AutoModelForCausalLM

    from megatron_ring.checkpoint import load_checkpoint
    from megatron_ring.config.recipe import PrecisionConfig, Recipe
    from megatron_ring.model.build import build_model
    from megatron_ring.model.inference import forward_logits

    cfg = json.loads((out / "ling_mcore" / "config.json").read_text())
    m32 = build_model(Recipe(name="ling32", hf_config=cfg, precision=PrecisionConfig(transformer_impl="local")))
    load_checkpoint(m32, out / "ling_mcore", cfg)
    tokens = torch.randint(3, ling["vocab_size"], (2, 32), generator=g)
    got = forward_logits(m32, tokens).cpu()
    del m32
    hf = AutoModelForCausalLM.from_pretrained(out / "ling_hf", trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits.float()
    del hf
    diff = (got - ref).abs().max().item()
    row("Ling-shaped logits: megatron (device, fp32) vs HF (CPU)", f"max abs diff {diff:.2e} (logits std "
        f"{ref.std().item():.3f})", diff <= 2e-3 * max(ref.std().item(), 1.0))

    lrec = Recipe(name="ling", hf_config=cfg, precision=PrecisionConfig(bf16=not dry, transformer_impl="local"))
    seq = 128 if dry else 4096
    n_mb = 2 if dry else 4
    for kind in ("sft", "rl"):
        r = train(lrec, out / "ling_mcore", kind, seq, n_mb, 2 if dry else 4, dev)
        loss = r.get("loss", r.get("pg_loss"))
        tps = r["tokens_per_s"]
        mfu = tps * flops_per_token(cfg, seq) / PEAK_BF16
        p = plan(cfg, lrec, kind, 1, 1e6, seq, seq, flash=False, microbatches=1)
        want = p.total - p.terms["runtime"]
        mem = (f", peak GPU {r['peak_bytes'] / GiB:.1f} GiB vs plan {want / GiB:.1f} GiB "
               f"({r['peak_bytes'] / want:.2f}x)") if dev.type == "cuda" else f", plan {want / GiB:.2f} GiB"
        row(f"Ling-shaped {kind} step ({seq} tokens x {n_mb})", f"loss {loss:.4f}, {tps:,.0f} tokens/s, "
            f"MFU {mfu:.1%}{mem}", bool(torch.isfinite(torch.tensor(loss))) and r["devices"] == [dev.type])
    row("wall time", f"{time.time() - t_start:.0f} s", None)
    table = ["| check | result | |", "|---|---|---|"] + [f"| {c} | {r} | {o} |" for c, r, o in ROWS]
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if all(o != "FAIL" for _, _, o in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
