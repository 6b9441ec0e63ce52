"""Distillation SFT on megatron-core: packed rows, per-token loss over the global batch, AdamW,
cosine schedule with warm-up, clipping, MoE aux/z losses from the recipe, checkpoints every N steps and
at every epoch end (written aside, renamed, ``latest`` pointer), and exact resume (model, optimizer,
scheduler, data position, RNG). Runs under torchrun/srun or as one process."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from ..checkpoint import adopt_architecture, load_checkpoint
from ..config.recipe import Recipe, _from_dict, load_recipe
from ..scalars import Progress, Scalars
from ..training.state import (PreemptionBudget, StopFlag, latest_checkpoint, load_training_state,
                              save_training_state)
from .data import collate, packed_row_to_sample


@dataclass
class SFTConfig:
    data: str = "runs/tiny/data/sft/packed.parquet"
    init: Optional[str] = None  # megatron-ring checkpoint to start from (None: random init)
    out: str = "runs/tiny/sft"
    epochs: int = 1
    global_batch_size: int = 8  # packed rows per optimizer step
    micro_batch_size: int = 2
    seq_length: Optional[int] = None  # the packed rows' length: checked against the data; the memory plan uses it
    lr: float = 1e-3
    min_lr: float = 1e-5
    lr_warmup_fraction: float = 0.01
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    save_interval: int = 0  # steps; 0: only at epoch ends
    save_every_minutes: float = 0.0  # also save when this long has passed since the last save (0: off)
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps in total
    log_interval: int = 1
    keep_last: int = 0  # keep the newest N checkpoints (+ milestones, + latest/selected); 0: keep all (selection
    keep_every: int = 0  # measures every checkpoint left: prune SFT runs only down to the milestones to choose from)
    wandb_project: Optional[str] = None  # Weights & Biases beside TensorBoard (same scalars); None: off
    wandb_mode: Optional[str] = None  # online | offline (default: $WANDB_MODE, else online)


def sft_config(recipe: Recipe, **overrides) -> SFTConfig:
    data = dict(recipe.stages.get("sft", {}))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return _from_dict(SFTConfig, data, f"recipe {recipe.name}: stages.sft")


class PackedDataset:
    """Packed rows kept as Arrow columns (not Python lists); a seeded permutation per epoch."""

    def __init__(self, path: str | Path, pad_id: int):
        t = pq.read_table(str(path), columns=["tokens", "loss_mask", "seq_lens"])
        self.tokens, self.mask, self.lens = t.column("tokens"), t.column("loss_mask"), t.column("seq_lens")
        self.pad_id = pad_id
        self.seq_len = len(self.tokens[0].as_py()) if len(t) else 0

    def __len__(self):
        return len(self.tokens)

    def sample(self, i: int) -> dict:
        return packed_row_to_sample(self.tokens[i].as_py(), self.mask[i].as_py(), self.lens[i].as_py(), self.pad_id)

    def order(self, epoch: int, seed: int) -> list[int]:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def train_sft(recipe: Recipe, cfg: SFTConfig) -> list[dict]:
    """Returns the per-step history (loss, lr, grad_norm, tokens, tokens/s) of this run (rank 0 logs)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ..model.build import build_model, token_multiple, use_transformer_engine
    from ..model.memory import check_gpu_fits
    from ..parallel.dist import init_distributed
    from ..training.core import OptimConfig, build_optimizer, report_moe_metrics, train_step, wrap_ddp

    run = Path(cfg.out)
    resume = latest_checkpoint(run)
    if resume is not None or cfg.init:  # the model is the checkpoint's; a recipe that disagrees is refused here
        recipe = adopt_architecture(recipe, resume if resume is not None else cfg.init)
    elif not recipe.hf_config:
        raise ValueError(f"recipe {recipe.name}: no --init checkpoint and no hf_config: nothing names the model")
    data = PackedDataset(cfg.data, pad_id=recipe.hf_config.get("pad_token_id", 0))
    if cfg.seq_length and data.seq_len != cfg.seq_length:
        raise ValueError(f"{cfg.data}: packed rows are {data.seq_len} tokens long, the recipe's seq_length is "
                         f"{cfg.seq_length} (data_tools pack --seq-len {cfg.seq_length})")
    mult = token_multiple(recipe)
    if (data.seq_len * cfg.micro_batch_size) % mult:
        raise ValueError(f"{cfg.data}: micro-batches of {cfg.micro_batch_size} x {data.seq_len} tokens are not a multiple "
                         f"of {mult} (TP{'; FP8 needs 16 per rank' if recipe.precision.fp8 else ''}): pack with "
                         f"another --seq-len")
    init_distributed(recipe.parallel, recipe.seed)
    check_gpu_fits(recipe, {"sft": {"micro_batch_size": cfg.micro_batch_size, "seq_length": data.seq_len}})
    model = build_model(recipe)
    # TE: each micro-batch is one THD sequence of micro_batch_size rows (packed attention by cu_seqlens)
    thd = use_transformer_engine(recipe)
    shape = (data.seq_len * cfg.micro_batch_size, 1) if thd else (data.seq_len, cfg.micro_batch_size)
    if resume is None and cfg.init:
        load_checkpoint(model, cfg.init, recipe.hf_config)
    dist_opt = recipe.memory.use_distributed_optimizer
    ddp = wrap_ddp(model, use_distributed_optimizer=dist_opt)
    opt = build_optimizer([ddp], OptimConfig(lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                             clip_grad=cfg.clip_grad, use_distributed_optimizer=dist_opt))
    dp, dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if cfg.global_batch_size % (dp * cfg.micro_batch_size):
        raise ValueError(f"global_batch_size {cfg.global_batch_size} must be a multiple of DP {dp} x "
                         f"micro_batch_size {cfg.micro_batch_size}")
    steps_per_epoch = len(data) // cfg.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(data)} packed rows < global_batch_size {cfg.global_batch_size}")
    total = steps_per_epoch * cfg.epochs
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=int(cfg.lr_warmup_fraction * total),
        lr_decay_steps=total, lr_decay_style="cosine", start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=total, wd_incr_style="constant")
    step = epoch = pos = 0
    history: list[dict] = []
    if resume is not None:
        ts, meta = load_training_state(resume, model, opt, sched)
        step, epoch, pos = ts["step"], ts["epoch"], ts["pos"]
        history = meta.get("history", [])
    saved_at = step
    tb = None
    if dist.get_rank() == 0:
        tb = Scalars(run, cfg.wandb_project, cfg.wandb_mode, config={"recipe": recipe.name, **vars(cfg)})
    per_rank = cfg.global_batch_size // dp
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    flag = StopFlag()
    budget = PreemptionBudget("sft", tb is not None)  # (the signal lead vs measured step + save times)
    progress = Progress("sft", stop, start=step, enabled=tb is not None)
    while step < stop:
        order = data.order(epoch, recipe.seed)
        while pos < steps_per_epoch and step < stop:
            rows = order[pos * cfg.global_batch_size:(pos + 1) * cfg.global_batch_size][dpr * per_rank:(dpr + 1) * per_rank]
            mbs = [collate([data.sample(i) for i in rows[k:k + cfg.micro_batch_size]], thd=thd)
                   for k in range(0, per_rank, cfg.micro_batch_size)]
            t0 = time.perf_counter()
            out = train_step([ddp], opt, mbs, len(mbs), *shape)
            sched.step(increment=1)
            step, pos = step + 1, pos + 1
            rec = {"step": step, "epoch": epoch, "loss": out["loss"], "grad_norm": out["grad_norm"],
                   "lr": opt.param_groups[0]["lr"], "tokens": out["tokens"],
                   "tokens_per_s": out["tokens"] / (time.perf_counter() - t0)}
            report_moe_metrics([ddp], len(mbs), step, tb if step % cfg.log_interval == 0 else None)
            history.append(rec)
            wait = budget.step(time.perf_counter() - t0)
            if tb is not None and step % cfg.log_interval == 0:
                for k in ("loss", "grad_norm", "lr", "tokens_per_s"):
                    tb.add_scalar(f"sft/{k}", rec[k], step)
                for k, v in wait.items():
                    tb.add_scalar(k, v, step)
                tb.flush()
                print(json.dumps(rec), flush=True)
            progress.step(step, {"epoch": epoch, "loss": rec["loss"], "tokens/s": rec["tokens_per_s"]})
            late = budget.out_of_time(time.perf_counter() - t0) and step < stop  # (the job's end is near)
            if flag.agreed() or late:
                stop = step  # preempted: the checkpoint below, then exit; a restart resumes from it
                if late:
                    budget.request_requeue(step)
                elif tb is not None:
                    print(json.dumps({"preempted_at_step": step}), flush=True)
                break
            due = cfg.save_interval and step % cfg.save_interval == 0 or budget.save_due(cfg.save_every_minutes)
            if due and step < stop:
                progress.phase(f"saving the step-{step} checkpoint")
                t_save = time.perf_counter()
                save_training_state(run, model, opt, sched, recipe, step, {"epoch": epoch, "pos": pos}, history,
                                    cfg.keep_last, cfg.keep_every)
                saved_at = step
                budget.saved(time.perf_counter() - t_save)
        if pos >= steps_per_epoch:
            epoch, pos = epoch + 1, 0
            save_training_state(run, model, opt, sched, recipe, step, {"epoch": epoch, "pos": pos}, history,
                                cfg.keep_last, cfg.keep_every)
            saved_at = step
    if saved_at != step or latest_checkpoint(run) is None:
        save_training_state(run, model, opt, sched, recipe, step, {"epoch": epoch, "pos": pos}, history,
                            cfg.keep_last, cfg.keep_every)
    progress.close()
    if tb is not None:
        tb.close()
    return history


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="megatron-ring sft")
    ap.add_argument("--recipe", default="sft_distill_tiny")
    for f in ("data", "init", "out"):
        ap.add_argument(f"--{f}")
    for f in ("epochs", "global_batch_size", "micro_batch_size", "save_interval", "max_steps", "log_interval",
              "keep_last", "keep_every"):
        ap.add_argument(f"--{f.replace('_', '-')}", dest=f, type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--save-every-minutes", type=float)
    ap.add_argument("--wandb-project", help="log the same scalars to Weights & Biases too (default: off)")
    ap.add_argument("--wandb-mode", choices=["online", "offline"], help="default: $WANDB_MODE, else online")
    ap.add_argument("--tp", type=int, default=None)
    ap.add_argument("--ep", type=int, default=None)
    ap.add_argument("--pp", type=int, default=None)
    a = ap.parse_args(argv)
    par = {k: v for k, v in {"tensor_model_parallel_size": a.tp, "expert_model_parallel_size": a.ep,
                             "pipeline_model_parallel_size": a.pp}.items() if v}
    recipe = load_recipe(a.recipe, {"parallel": par} if par else None)
    cfg = sft_config(recipe, **{k: getattr(a, k) for k in ("data", "init", "out", "epochs", "global_batch_size",
                                                          "micro_batch_size", "save_interval", "max_steps", "lr",
                                                          "log_interval", "wandb_project", "wandb_mode",
                                                          "keep_last", "keep_every", "save_every_minutes")})
    train_sft(recipe, cfg)
    return 0
