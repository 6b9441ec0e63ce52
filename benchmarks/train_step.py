"""Benchmark: one training step of the tiny Bailing MoE in megatron-core vs the HF model, same weights,
same batch, side by side on this machine (CPU: fp32, TP1; on a GPU the same script uses CUDA).

    .venv/bin/python benchmarks/train_step.py [--batch 4] [--seq 256] [--steps 10]

Prints a table with ms/step, tokens/s and the ratio against the HF baseline.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, steps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from megatron_ring.config.recipe import PrecisionConfig, Recipe
    from megatron_ring.convert.mapping import hf_to_mcore
    from megatron_ring.convert.run import load_full_state
    from megatron_ring.init_model import init_hf_checkpoint
    from megatron_ring.model.build import build_model
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.parallel.dist import init_distributed
    from megatron_ring.training.core import OptimConfig, build_optimizer, train_step, wrap_ddp
    from megatron_ring.convert.hf_io import read_hf_state

    tmp = Path(tempfile.mkdtemp())
    init_hf_checkpoint(tmp / "hf", "tiny", seed=0)
    cfg = load_hf_config(tmp / "hf")
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(6, cfg["vocab_size"], (a.batch, a.seq + 1), generator=g).to(dev)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(a.batch, a.seq, device=dev)}
    oc = OptimConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0)

    # megatron-core
    recipe = Recipe(name="bench", hf_config=cfg, precision=PrecisionConfig(transformer_impl="local"))
    init_distributed(recipe.parallel, seed=0)
    model = build_model(recipe)
    load_full_state(model, hf_to_mcore(read_hf_state(tmp / "hf"), cfg))
    if dev == "cuda":
        model.cuda()
    ddp = wrap_ddp(model)
    opt = build_optimizer([ddp], oc)
    mc_loss = []
    mc = _time(lambda: mc_loss.append(train_step([ddp], opt, [batch], 1, a.seq, a.batch)["loss"]), a.steps)

    # HF baseline: plain PyTorch AdamW on the same weights and batch
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=True, dtype=torch.float32).to(dev).train()
    hopt = torch.optim.AdamW(hf.parameters(), lr=oc.lr, betas=(oc.adam_beta1, oc.adam_beta2), weight_decay=oc.weight_decay)
    hf_loss = []

    def hf_step():
        hopt.zero_grad(set_to_none=True)
        logits = hf(batch["tokens"], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), oc.clip_grad)
        hopt.step()
        hf_loss.append(loss.item())

    hfs = _time(hf_step, a.steps)

    ntok = a.batch * a.seq
    rows = [("HF transformers (baseline)", hfs, hf_loss), ("megatron-core", mc, mc_loss)]
    base = statistics.median(hfs)
    print(f"\ntiny Bailing MoE train step, batch {a.batch} x seq {a.seq} = {ntok} tokens, {dev}, "
          f"{torch.get_num_threads()} threads, {a.steps} timed steps (median)\n")
    print(f"| {'implementation':28} | {'ms/step':>9} | {'tokens/s':>9} | {'vs HF':>6} | {'first loss':>10} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 11}|{'-' * 8}|{'-' * 12}|")
    for name, ts, losses in rows:
        med = statistics.median(ts)
        print(f"| {name:28} | {med * 1e3:9.1f} | {ntok / med:9.0f} | {base / med:5.2f}x | {losses[0]:10.4f} |")
    print("\n('vs HF' > 1 means faster than the HF baseline. megatron's step includes DDP buffers, the MoE aux/z"
          " router losses and megatron's optimizer; the first losses must agree since the weights are the same.)")


if __name__ == "__main__":
    main()
