"""``megatron-ring verify``: load a megatron dist checkpoint at a parallel layout (run under torchrun)
and compare it with the HF checkpoint of the same weights: logits max-abs difference, loss, and
greedy decoding (megatron re-forward vs HF ``generate()`` with its KV cache)."""
from __future__ import annotations

import json

import torch


def verify(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, ep: int = 1, dispatcher: str = "alltoall",
           greedy: int = 0, out: str | None = None, seq: int = 24, tol: float = 1e-5) -> dict:
    import torch.distributed as dist

    from ..checkpoint import load_checkpoint
    from ..config.recipe import ParallelConfig, PrecisionConfig, Recipe
    from ..model.build import build_model
    from ..model.hf_config import load_hf_config
    from ..model.inference import forward_logits, greedy_generate
    from ..parallel.dist import init_distributed

    cfg = load_hf_config(hf_dir)
    recipe = Recipe(name="verify", hf_config=cfg, precision=PrecisionConfig(transformer_impl="local"),
                    parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                            expert_model_parallel_size=ep, moe_token_dispatcher_type=dispatcher))
    init_distributed(recipe.parallel, seed=7)
    model = build_model(recipe)
    load_checkpoint(model, ckpt, cfg)

    tokens = torch.randint(0, cfg["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(123))
    logits = forward_logits(model, tokens)
    report: dict = {}
    hf = None
    if logits is not None:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(tokens, use_cache=False).logits.float()
        ce = torch.nn.functional.cross_entropy
        report = {"layout": {"tp": tp, "pp": pp, "ep": ep, "dispatcher": dispatcher},
                  "max_abs_diff": (logits - ref).abs().max().item(),
                  "logits_std": ref.std().item(),
                  "loss_megatron": ce(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item(),
                  "loss_hf": ce(ref[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item(),
                  "shape": list(logits.shape)}
    if greedy:
        prompt = tokens[:, :6]
        mg = greedy_generate(model, prompt, greedy)
        if hf is not None:
            with torch.no_grad():
                hg = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=greedy,
                                 min_new_tokens=greedy, do_sample=False, pad_token_id=cfg.get("pad_token_id"))
            report.update(greedy_megatron=mg.tolist(), greedy_hf=hg.tolist(),
                          greedy_equal=mg.tolist() == hg.tolist())
    from megatron.core import parallel_state as ps

    if report and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        report["ok"] = report["max_abs_diff"] <= tol and report.get("greedy_equal", True)
        print(json.dumps({k: v for k, v in report.items() if not k.startswith("greedy_") or k == "greedy_equal"}))
        if out:
            with open(out, "w") as f:
                json.dump(report, f)
    dist.barrier()
    if report and "ok" not in report:
        report["ok"] = report["max_abs_diff"] <= tol and report.get("greedy_equal", True)
    return report
