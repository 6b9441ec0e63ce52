"""``megatron-ring rl``: the RL stage's command line (the recipe's ``stages.rl`` settings, each overridable), and
``--print-launch`` for the job scripts."""
from __future__ import annotations

from ..config.recipe import load_recipe
from .config import ContextTooLong, launch_facts, rl_config


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="megatron-ring rl")
    ap.add_argument("--recipe", default="rl_stage1_tiny")
    for f in ("prompts", "init", "out", "tokenizer", "mode", "loss_agg", "engine", "weight_transport",
              "weight_senders", "sglang_router"):
        ap.add_argument(f"--{f.replace('_', '-')}", dest=f)
    for f in ("steps", "max_steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "token_budget",
              "mini_batches", "eval_interval", "eval_limit", "eval_k", "save_interval", "reward_workers",
              "keep_last", "keep_every", "weight_bucket_mb", "server_inflight", "max_prompt_tokens",
              "lr_warmup_steps"):
        ap.add_argument(f"--{f.replace('_', '-')}", dest=f, type=int)
    for f in ("lr", "kl_coef", "entropy_coef", "temperature", "top_p", "tis_cap", "adam_beta1", "adam_beta2",
              "adam_eps", "save_every_minutes", "request_timeout_s"):
        ap.add_argument(f"--{f.replace('_', '-')}", dest=f, type=float)
    ap.add_argument("--eval-sets", nargs="*")
    ap.add_argument("--wandb-project", help="log the same scalars to Weights & Biases too (default: off)")
    ap.add_argument("--wandb-mode", choices=["online", "offline"], help="default: $WANDB_MODE, else online")
    ap.add_argument("--sglang-urls", nargs="*")
    ap.add_argument("--sandbox-unsafe", action="store_true", default=None)
    ap.add_argument("--deterministic-rollouts", action=argparse.BooleanOptionalAction, default=None,
                    help="servers under SGLang's deterministic inference, each sample seeded (default: the recipe)")
    ap.add_argument("--keep-uninformative", dest="drop_uninformative", action="store_false", default=None,
                    help="train on groups whose rewards are all equal too (their advantage is 0)")
    ap.add_argument("--print-launch", action="store_true",
                    help="print, as shell assignments, the resolved start checkpoint, run dir, tokenizer and the "
                         "rollout servers' context, and exit; refused (exit 2) when prompt + max_new_tokens exceed "
                         "the model's positions without the recipe allowing it")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--ep", type=int)
    ap.add_argument("--pp", type=int)
    a = ap.parse_args(argv)
    par = {k: v for k, v in {"tensor_model_parallel_size": a.tp, "expert_model_parallel_size": a.ep,
                             "pipeline_model_parallel_size": a.pp}.items() if v}
    recipe = load_recipe(a.recipe, {"parallel": par} if par else None)
    skip = {"recipe", "tp", "ep", "pp", "print_launch"}
    cfg = rl_config(recipe, **{k: v for k, v in vars(a).items() if k not in skip})
    if a.print_launch:
        import shlex
        import sys

        try:
            facts = launch_facts(recipe, cfg)
        except ContextTooLong as e:
            print(f"megatron-ring rl: {e}", file=sys.stderr)
            return 2
        print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in facts.items()))
        return 0
    from .trainer import train_rl

    train_rl(recipe, cfg)
    return 0
