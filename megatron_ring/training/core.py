"""The megatron-core training step shared by SFT and RL: DDP wrapping, the megatron optimizer, and
one global step over micro-batches with a per-token loss averaged over the whole global batch
(the same result whatever the DP / micro-batch split)."""
from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..model.inference import position_ids_for
from ..parallel.dist import all_reduce_floats, module_device, to_device


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    lr_overrides: Optional[dict] = None  # parameter-name glob -> lr (a megatron-core param-group override)


_DDP_OF: "weakref.WeakKeyDictionary[torch.nn.Module, DistributedDataParallel]" = weakref.WeakKeyDictionary()


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool = False,
             bucket_size: int | None = None) -> DistributedDataParallel:
    """megatron's DDP around ``model``. Gradients are reduced in buckets (``bucket_size`` parameters; default
    megatron's, 40M) while the last micro-batch's backward still runs (``overlap_grad_reduce``, as Megatron-Bridge's
    Moonlight-16B recipe): megatron's schedules hold the reduction off for the other micro-batches through
    ``config.no_sync_func``, and ``finalize_model_grads`` waits for it. With the distributed optimizer the updated
    parameters are all-gathered bucket by bucket during the next forward (``overlap_param_gather``): until then each
    rank holds only its own shard updated, so whatever reads the weights outside a forward calls
    ``gathered_params`` first (checkpoint saves and the RL weight sync do)."""
    cfg = model.config
    # before DDP is built: with per-token losses DDP must sum (not average) gradients over DP
    cfg.finalize_model_grads_func = finalize_model_grads
    if not cfg.calculate_per_token_loss:  # the routers were built with it; setting it now is too late
        raise ValueError("the model was built without calculate_per_token_loss=True (model.build.transformer_config "
                         "sets it): its MoE aux/z losses would be scaled for a per-micro-batch mean loss")
    ddp = DistributedDataParallel(cfg, ddp_config(cfg, use_distributed_optimizer, bucket_size), module=model)
    cfg.no_sync_func = ddp.no_sync
    _DDP_OF[model] = ddp
    return ddp


def gathered_params(model: torch.nn.Module) -> None:
    """Collective over the DP groups (every rank calls it): finish the parameter all-gathers that megatron's DDP left
    for the next forward pass (``overlap_param_gather``), so the weights are the updated ones on every rank. ``model``
    is a DDP or the module it wraps; a no-op without the overlap or once a forward has gathered every bucket. Megatron-LM
    does the same before every checkpoint save and evaluation (``disable_forward_pre_hook(param_sync=True)``)."""
    ddp = model if isinstance(model, DistributedDataParallel) else _DDP_OF.get(model)
    if ddp is None or not ddp.ddp_config.overlap_param_gather:
        return
    with torch.no_grad():
        for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
            if group.param_gather_dispatched and group.param_gather_handle is None:
                continue  # gathered (by a forward's pre-hook, or here before)
            ddp._start_bucket_group_param_sync(group, force_sync=True)


def ddp_config(model_config, use_distributed_optimizer: bool, bucket_size: int | None = None
               ) -> DistributedDataParallelConfig:
    """megatron's DDP settings for a model. FP8 primary weights (``fp8_param``) are updated by the distributed
    optimizer only through ``fp8_param_gather`` (megatron-core's distrib_optimizer quantizes the new master weights
    into them there and skips them in the plain copy): the two go together, as Megatron-LM and Megatron-Bridge tie
    them."""
    fp8_param = bool(getattr(model_config, "fp8_param", False))
    if fp8_param and not use_distributed_optimizer:
        raise ValueError("precision.fp8_param needs memory.use_distributed_optimizer: true (megatron gathers FP8 "
                         "parameters through the distributed optimizer only)")
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True, bucket_size=bucket_size,
                                         use_distributed_optimizer=use_distributed_optimizer,
                                         overlap_param_gather=use_distributed_optimizer,
                                         check_for_nan_in_grad=True, fp8_param_gather=fp8_param)


def build_optimizer(chunks: list[torch.nn.Module], oc: OptimConfig):
    cfg = chunks[0].config
    mc = OptimizerConfig(optimizer="adam", lr=oc.lr, min_lr=oc.min_lr, weight_decay=oc.weight_decay,
                         adam_beta1=oc.adam_beta1, adam_beta2=oc.adam_beta2, adam_eps=oc.adam_eps,
                         clip_grad=oc.clip_grad, bf16=cfg.bf16, fp16=cfg.fp16, params_dtype=cfg.params_dtype,
                         use_distributed_optimizer=oc.use_distributed_optimizer)
    overrides = get_standard_config_overrides(mc)  # (no weight decay on norms and biases)
    names = [n for c in chunks for n, _ in c.named_parameters()]
    for glob, lr in (oc.lr_overrides or {}).items():
        if not any(fnmatch.fnmatch(n, glob) for n in names):
            raise ValueError(f"lr_overrides: {glob!r} matches no parameter (e.g. {names[-1]!r})")
        overrides[ParamKey(name=glob)] = {"max_lr": float(lr), "min_lr": float(lr)}
    opt = get_megatron_optimizer(mc, chunks, config_overrides=overrides)
    for c in chunks:  # megatron's schedules scale each micro-batch's loss (and the MoE aux losses) by the optimizer's
        # loss scale through this, as Megatron-LM wires it: fp16 trains with dynamic loss scaling (1.0 for bf16/fp32)
        c.config.grad_scale_func = opt.scale_loss
    # megatron applies wd_mult / max_lr in OptimizerParamScheduler.step; until one runs (or without one) the
    # groups would all decay at the full rate, norms and biases too: start from the constant schedule's values
    for o in getattr(opt, "chained_optimizers", [opt]):
        for g in o.param_groups:
            g["weight_decay"] = oc.weight_decay * g.get("wd_mult", 1.0)
            g["lr"] = g.get("max_lr", oc.lr)
    return opt


def lm_loss_func(loss_mask: torch.Tensor):
    """Per-token LM loss summed over the micro-batch, with its token count: megatron divides by the
    total count over all micro-batches and DP ranks (``calculate_per_token_loss``)."""

    def loss_func(output_tensor: torch.Tensor):
        mask = loss_mask.float()
        total = (output_tensor.float() * mask).sum()
        n = mask.sum().to(torch.int)
        return total, n, {"lm loss": torch.stack([total.detach(), mask.sum().detach()])}

    return loss_func


def lm_forward_step(data_iter, model):
    batch = to_device(next(data_iter), module_device(model))  # built on the host, run where the model is
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    out = model(tokens, batch.get("position_ids", position_ids_for(tokens)), batch.get("attention_mask"),
                labels=labels, packed_seq_params=batch.get("packed_seq_params"))
    return out, lm_loss_func(loss_mask)


def train_step(chunks: list[torch.nn.Module], optimizer, micro_batches: Iterable[dict], num_microbatches: int,
               seq_length: int, micro_batch_size: int, forward_step: Callable = lm_forward_step,
               report_keys: tuple[str, ...] = ("lm loss",)) -> dict:
    """One optimizer step. Returns 'grad_norm' and, for each reported [sum, count] pair of the loss
    function (``report_keys``), sum/count over the global batch on every rank: for the LM loss 'loss'
    (the global token mean) and 'tokens'."""
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    stats = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    # every reported [sum, count] pair, summed over micro-batches and DP ranks, broadcast over PP
    keys = list(report_keys)
    sums = [0.0] * (2 * len(keys))
    if ps.is_pipeline_last_stage(ignore_virtual=True) and stats:
        sums = torch.stack([torch.stack([s[k].float() for k in keys]) for s in stats]).sum(0).flatten().tolist()
    sums = all_reduce_floats(sums, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        sums = all_reduce_floats(sums, group=ps.get_pipeline_model_parallel_group())
    out = {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "update_ok": bool(update_ok)}
    for i, k in enumerate(keys):
        out[k.replace(" ", "_")] = sums[2 * i] / max(sums[2 * i + 1], 1e-12)
        out[k.replace(" ", "_") + "_count"] = sums[2 * i + 1]
    if "lm_loss" in out:  # the SFT/LM names
        out["loss"], out["tokens"] = out.pop("lm_loss"), int(out.pop("lm_loss_count"))
    return out

MOE_METRICS = ["load_balancing_loss", "z_loss"]


def report_moe_metrics(chunks: list[torch.nn.Module], num_microbatches: int, step: int, writer=None) -> str:
    """Collective (every rank calls it once per step). megatron's router records each MoE layer's aux
    balance loss and z-loss during the forward pass (divided by their coefficients: 1.0 = perfectly balanced
    for the switch aux loss); megatron's tracker reduces them over PP/TP/DP and writes ``load_balancing_loss``,
    ``z_loss`` and ``moe/<metric>_layer_<i>`` scalars to TensorBoard (rank 0 passes its writer)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    cfg = chunks[0].config
    if not getattr(cfg, "num_moe_experts", None):
        return ""
    return get_moe_metrics_tracker().report(
        loss_scale=1.0 / max(num_microbatches, 1), iteration=step, writer=writer, per_layer_logging=True,
        force_initialize=True, track_names=MOE_METRICS, num_layers=cfg.num_layers)
