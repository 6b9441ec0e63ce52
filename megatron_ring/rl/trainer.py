"""The RL stage driver (``megatron-ring rl``): builds the policy (megatron-core, DDP, AdamW), the frozen
reference, the rollout engine and the reward pool; runs ``step.rl_step`` with held-out evaluation,
metrics (TensorBoard + metrics.jsonl), atomic checkpoints and exact resume (prompt order and sampling
seeds are functions of the step; model, optimizer, scheduler and RNG come from the checkpoint)."""
from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..checkpoint import adopt_architecture, load_checkpoint
from ..parallel.dist import all_reduce_floats
from ..config.recipe import Recipe
from ..training.state import (PreemptionBudget, StopFlag, latest_checkpoint, load_training_state,
                              save_training_state)
from .config import RLConfig, client_timeout, resolve_start, rollout_context, transport_kind
from .policy import empty_like, make_microbatches, rl_forward_step, score_logprobs
from ..rewards import reward_job
from ..scalars import Progress, Scalars
from .rollout import Interrupted, SamplingParams, chat_prompt_ids
from .step import as_tensor, rl_step

REPORT = ("pg loss", "kl", "entropy", "clipfrac", "logp_mismatch")


class Preempted(Exception):
    """The step was given up inside its generate phase (a preemption signal): save the step boundary's state."""


class RLState:
    def __init__(self, recipe: Recipe, cfg: RLConfig):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from ..model.build import build_model, token_multiple, use_transformer_engine
        from ..model.memory import check_gpu_fits
        from ..parallel.dist import init_distributed
        from ..tokenizer.tiny import load_tokenizer
        from ..training.core import OptimConfig, build_optimizer, wrap_ddp

        self.cfg, self.run = cfg, Path(cfg.out)
        self.resume = latest_checkpoint(self.run)
        self.start = resolve_start(cfg.init)
        # the checkpoint's architecture; a recipe that disagrees is refused before anything is built
        self.recipe = recipe = adopt_architecture(recipe, self.resume or self.start)
        rollout_context(cfg, recipe.hf_config)  # refused before anything is built or started
        init_distributed(recipe.parallel, recipe.seed)
        self.rank0 = dist.get_rank() == 0
        # rollout control (rank 0 generates and scores while the others wait): gloo, with its own timeout — not
        # inside an NCCL collective whose 30-minute watchdog a long rollout phase would outlast
        import datetime

        self.ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=cfg.rollout_timeout_minutes))
        check_gpu_fits(recipe, {"rl": dataclasses.asdict(cfg)})  # refused here, before anything is allocated
        self.policy = build_model(recipe)
        if self.resume is None:
            load_checkpoint(self.policy, self.start, recipe.hf_config)
        dist_opt = recipe.memory.use_distributed_optimizer
        self.ddp = wrap_ddp(self.policy, use_distributed_optimizer=dist_opt)
        self.opt = build_optimizer([self.ddp], OptimConfig(
            lr=cfg.lr, min_lr=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad, lr_overrides=cfg.lr_overrides,
            use_distributed_optimizer=dist_opt))
        n_opt = cfg.steps * cfg.mini_batches
        self.sched = OptimizerParamScheduler(
            self.opt, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr, min_lr=cfg.lr,
            lr_warmup_steps=cfg.lr_warmup_steps * cfg.mini_batches, lr_decay_steps=n_opt, lr_decay_style="constant",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=n_opt, wd_incr_style="constant")
        self.ref = None
        if cfg.kl_coef:
            self.ref = build_model(recipe)
            load_checkpoint(self.ref, self.start, recipe.hf_config)
            self.ref.requires_grad_(False)
        self.step, self.history = 0, []
        self.flag = self.progress = None  # (set by train_rl: the preemption flag, the progress line)
        if self.resume is not None:
            ts, meta = load_training_state(self.resume, self.policy, self.opt, self.sched)
            self.step, self.history = ts["step"], meta.get("history", [])
        self.tok = load_tokenizer(cfg.tokenizer)
        self.rows = pq.read_table(cfg.prompts).to_pylist()
        if len(self.rows) < cfg.prompts_per_step:
            raise ValueError(f"{cfg.prompts}: {len(self.rows)} prompts < prompts_per_step {cfg.prompts_per_step}")
        if self.rank0:
            for i, ids in enumerate(self.encode(self.rows)):
                if len(ids) > cfg.max_prompt_tokens:
                    raise ValueError(f"{cfg.prompts}: row {i}: the prompt is {len(ids)} tokens, more than "
                                     f"max_prompt_tokens {cfg.max_prompt_tokens} (the rollout servers' context is "
                                     f"sized by it): filter the prompt set or raise max_prompt_tokens")
        self.dp, self.dpr = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.multiple = token_multiple(recipe)  # TP, x16 under FP8
        self.thd = use_transformer_engine(recipe)  # TE: sequences packed back to back (no padding to the longest)
        self.engine = self.pool = None
        if self.rank0:
            self.engine, self.pool = self._engine(), self._rewards()
        self.sync_weights(self.step)

    # --- rollout side (rank 0) -------------------------------------------------------------------------
    def _engine(self):
        if self.cfg.engine == "sglang":
            from .sglang_engine import SGLangEngine, sync_rendezvous

            c = self.cfg
            addr, port = sync_rendezvous(0)  # (the job scripts set the port)
            eng = SGLangEngine(c.sglang_urls, self.recipe.hf_config, self.tok, transport_kind(c),
                               self.run / "weight_sync", addr, port, c.server_inflight, client_timeout(c),
                               group=self.ctrl, senders=c.weight_senders, router=c.sglang_router,
                               deterministic=c.deterministic_rollouts)
            eng.wait_ready()
            return eng
        from .rollout import InProcessEngine

        return InProcessEngine(self.recipe.hf_config, self.tok, self.cfg.rollout_batch_size)

    def _rewards(self):
        from ..rewards import RewardPool

        return RewardPool(self.cfg.reward_workers, allow_unsafe=self.cfg.sandbox_unsafe,
                          timeout_s=self.cfg.reward_timeout_s, code_timeout_s=self.cfg.code_reward_timeout_s)

    def encode(self, rows: list[dict]) -> list[list[int]]:
        return chat_prompt_ids(self.tok, rows)

    def prompts_for(self, step: int) -> list[dict]:
        """The step's prompts: consecutive slices of a seeded permutation per pass over the prompt set."""
        P, n = self.cfg.prompts_per_step, len(self.rows)
        per_epoch = n // P
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.recipe.seed * 7919 + epoch)).tolist()
        return [self.rows[i] for i in order[k * P:(k + 1) * P]]

    def generate(self, prompts: list[dict], step: int):
        """Rank 0 asks the engine; a preemption signal during it ends the generation (``Preempted``: nothing of the
        step has changed yet, so the checkpoint is the step boundary's and a restart redoes the step exactly)."""
        obj = [None]
        if self.rank0:
            sp = SamplingParams(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p,
                                seed=self.recipe.seed * 1_000_003 + step)
            if self.progress is not None:
                self.progress.note(f"generating step {step + 1}: {len(prompts)} prompts x "
                                   f"{self.cfg.samples_per_prompt}")
            try:
                obj = [self.engine.generate(self.encode(prompts), self.cfg.samples_per_prompt, sp,
                                            (lambda: self.flag.requested) if self.flag else None)]
            except Interrupted as e:
                obj = [f"interrupted: {e}"]
            self.engine.before_training()  # colocated servers release their GPU memory
        dist.broadcast_object_list(obj, src=0, group=self.ctrl)
        if isinstance(obj[0], str):
            raise Preempted(obj[0])
        return obj[0]

    def score(self, prompts: list[dict], rollouts) -> torch.Tensor:
        obj = [None]
        if self.rank0:
            K = self.cfg.samples_per_prompt
            jobs = [reward_job(prompts[r.prompt_index], r.text, r.finish_reason == "length") for r in rollouts]
            rewards = self.pool.map(jobs)
            assert len(rewards) == len(prompts) * K
            obj = [[(x.value, x.reason) for x in rewards]]
        dist.broadcast_object_list(obj, src=0, group=self.ctrl)
        for r, (v, why) in zip(rollouts, obj[0]):
            r.reward, r.reward_reason = v, why
        return as_tensor([v for v, _ in obj[0]])

    # --- policy side (every rank) ------------------------------------------------------------------------
    def my_groups(self, rollouts, adv: torch.Tensor) -> list:
        K = self.cfg.samples_per_prompt
        return [(r, float(a)) for i, (r, a) in enumerate(zip(rollouts, adv.tolist())) if (i // K) % self.dp == self.dpr]

    @staticmethod
    def sequences(mine: list, kept: list[int], weights: list[float]) -> list[dict]:
        return [{"prompt_ids": r.prompt_ids, "response_ids": r.response_ids[:k], "adv": a, "weight": w,
                 "rollout_logp": r.logprobs[:k]} for (r, a), k, w in zip(mine, kept, weights) if k > 0]

    def _minibatches(self, seqs: list[dict]) -> list[list[dict]]:
        """Contiguous parts of (nearly) equal token count."""
        n = self.cfg.mini_batches
        total = sum(len(s["response_ids"]) for s in seqs)
        parts, acc = [[] for _ in range(n)], 0
        for s in seqs:
            parts[min(n - 1, int(acc * n / max(total, 1)))].append(s)
            acc += len(s["response_ids"])
        return parts

    def add_reference_logprobs(self, seqs: list[dict]) -> None:
        self.minis = []
        for part in self._minibatches(seqs):
            mbs = make_microbatches(part, self.cfg.max_tokens_per_microbatch, seq_multiple=self.multiple,
                                    thd=self.thd)
            mbs = self._equalize(mbs)
            if self.ref is not None:
                for b, lp in zip(mbs, score_logprobs(self.ref, mbs, self.cfg.temperature) or []):
                    b["ref_logp"] = lp
            if self.cfg.mini_batches > 1 or self.cfg.tis_cap:  # π_old before any update of this step
                for b, lp in zip(mbs, score_logprobs(self.policy, mbs, self.cfg.temperature) or []):
                    b["old_logp"] = lp
            self.minis.append((mbs, part))

    def _equalize(self, mbs: list[dict]) -> list[dict]:
        """Every DP rank runs the same number of micro-batches (EP all-to-alls pair them up)."""
        n = int(all_reduce_floats([len(mbs)], op="max", group=ps.get_data_parallel_group())[0])
        if not mbs:
            S = max(self.multiple, 2)
            mbs = [{"tokens": torch.zeros(1, S, dtype=torch.long), "labels": torch.zeros(1, S, dtype=torch.long),
                    "loss_mask": torch.zeros(1, S), "position_ids": torch.arange(S)[None], "adv": torch.zeros(1, S),
                    "weight": torch.zeros(1, S), "rollout_logp": torch.zeros(1, S)}]
            return mbs + [empty_like(mbs[0]) for _ in range(n - 1)]
        return mbs + [empty_like(mbs[0]) for _ in range(n - len(mbs))]

    def _denominator(self, part: list[dict]) -> float:
        """This mini-batch's share of the loss denominator (summed over DP ranks by megatron)."""
        c = self.cfg
        if c.loss_agg == "c3po":
            return c.token_budget / c.mini_batches
        if c.loss_agg == "token-mean":
            return float(sum(len(s["response_ids"]) for s in part))
        return float(len(part))

    def loss_config(self, part: list[dict], n_microbatches: int) -> dict:
        """What ``rl_forward_step`` needs for one mini-batch: the coefficients and its loss denominator (carried
        by its first micro-batch)."""
        c = self.cfg
        return {"clip_eps": c.clip_eps, "kl_coef": c.kl_coef, "kl_kind": c.kl_estimator, "entropy_coef": c.entropy_coef,
                "temperature": c.temperature, "tis_cap": c.tis_cap,
                "denominators": iter([self._denominator(part)] + [0.0] * (n_microbatches - 1))}

    def update(self, seqs: list[dict]) -> dict:
        from ..training.core import report_moe_metrics, train_step

        agg: dict[str, list] = defaultdict(list)
        # no group with signal anywhere: no optimizer step (Adam would move on momentum alone)
        if all_reduce_floats([len(seqs)], group=ps.get_data_parallel_group())[0] == 0:
            return {"grad_norm": 0.0, "lr": self.opt.param_groups[0]["lr"], "skipped": 1.0}
        for mbs, part in self.minis:
            fcfg = self.loss_config(part, len(mbs))
            out = train_step([self.ddp], self.opt, mbs, len(mbs), mbs[0]["tokens"].shape[1], mbs[0]["tokens"].shape[0],
                             forward_step=rl_forward_step(fcfg), report_keys=REPORT)
            self.sched.step(increment=1)
            report_moe_metrics([self.ddp], len(mbs), self.step + 1, self.tb)
            for k, v in out.items():
                agg[k].append(v)
        res = {k: sum(v) / len(v) for k, v in agg.items() if not k.endswith("_count") and k != "update_ok"}
        res["lr"] = self.opt.param_groups[0]["lr"]
        return res

    def sync_weights(self, version: int) -> dict:
        """The policy's weights to the rollout engine, gathered in memory bucket by bucket (rl/weights.py) and
        sent by the engine's transport (rl/transport.py) as they are assembled; no file unless the transport is
        ``disk``. Returns ``sync/gathered_mb``: what crossed between trainer ranks on the way (0 when every rank
        sends what it holds whole: experts, PP layers)."""
        from .sglang_engine import peer_transport
        from .weights import stream_hf_weights

        flag = getattr(self, "flag", None)
        if flag is not None and flag.agreed():  # a stop was asked for: the servers may be going already (Slurm
            return {"sync/skipped": 1.0}        # signals every step); the restart syncs the saved weights first
        if not hasattr(self, "_tr"):  # (made once: the IPC transport makes process groups; collective)
            self._tr = self.engine.transport() if self.rank0 else peer_transport(
                transport_kind(self.cfg), self.run / "weight_sync", self.recipe.hf_config, self.ctrl,
                self.cfg.weight_senders)
        tr = self._tr
        if tr is not None:
            tr.begin(version)
        try:
            fig = stream_hf_weights(self.policy, self.recipe.hf_config, tr.bucket if tr else None,
                                    bucket_bytes=self.cfg.weight_bucket_mb << 20, spread=getattr(tr, "spread", False),
                                    replicate=getattr(tr, "replicate", False), turns=getattr(tr, "turns", None),
                                    by_stage=getattr(tr, "by_stage", False))
        except BaseException:
            getattr(tr, "abandon", lambda: None)()  # the servers' sessions closed: a restart can sync again
            raise
        if tr is not None:
            tr.end()
        if self.rank0 and not self.engine.health():
            raise RuntimeError("rollout engine unhealthy after the weight sync")
        gathered = torch.tensor([float(fig["bytes_received"])], dtype=torch.float64)
        dist.all_reduce(gathered, group=self.ctrl)
        return {"sync/gathered_mb": gathered.item() / 2**20}

    def rollout_metrics(self, prompts: list[dict], rollouts, rewards: torch.Tensor, lengths: list[int],
                        kept: list[int]) -> dict:
        m = {"reward/mean": float(rewards.mean()), "response_length": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
             "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)}
        by = defaultdict(list)
        for r in rollouts:
            by[prompts[r.prompt_index]["domain"]].append(r.reward)
        for d, v in by.items():
            m[f"reward/{d}"] = sum(v) / len(v)
        m["reward/grader_timeouts"] = sum(r.reward_reason == "grader_timeout" for r in rollouts)
        m["tokens/generated"], m["tokens/kept"] = all_reduce_floats([sum(lengths), sum(kept)],
                                                                    group=ps.get_data_parallel_group())
        per_rank = [None] * ps.get_data_parallel_world_size()  # [generated, kept] of each DP rank (Φ is per rank)
        dist.all_gather_object(per_rank, [sum(lengths), sum(kept)], group=ps.get_data_parallel_group())
        m["tokens/per_dp_rank"] = per_rank
        return m

    # --- evaluation, checkpoints, the loop ----------------------------------------------------------------
    def evaluate(self) -> dict:
        """Greedy held-out accuracy of the current weights (the rollout engine's copy) per eval set. A preemption
        signal ends it at the next token: the evaluation is dropped (the step's own record and checkpoint are not)."""
        out = {}
        if self.rank0:
            for path in self.cfg.eval_sets:
                rows = pq.read_table(path).to_pylist()[: self.cfg.eval_limit]
                k = self.cfg.eval_k
                sp = SamplingParams(self.cfg.max_new_tokens, 0.0 if k == 1 else self.cfg.temperature, self.cfg.top_p,
                                    seed=12345)
                try:
                    rs = self.engine.generate(self.encode(rows), k, sp,
                                              (lambda: self.flag.requested) if self.flag else None)
                except Interrupted as e:
                    print(json.dumps({"evaluation_dropped": str(e)}), flush=True)
                    out = {}
                    break
                jobs = [reward_job(rows[r.prompt_index], r.text, r.finish_reason == "length") for r in rs]
                out[f"eval/{Path(path).stem}"] = sum(x.value for x in self.pool.map(jobs)) / max(len(rs), 1)
        obj = [out]
        dist.broadcast_object_list(obj, src=0, group=self.ctrl)
        return obj[0]


def train_rl(recipe: Recipe, cfg: RLConfig) -> list[dict]:
    s = RLState(recipe, cfg)
    recipe = s.recipe  # with the start checkpoint's architecture (what every checkpoint of the run carries)
    s.tb = None
    if s.rank0:
        s.tb = Scalars(s.run, cfg.wandb_project, cfg.wandb_mode, config={"recipe": recipe.name, **vars(cfg)})
    stop = min(cfg.steps, cfg.max_steps) if cfg.max_steps else cfg.steps
    s.flag = flag = StopFlag()
    s.progress = progress = Progress("rl", stop, start=s.step, every_s=0, enabled=s.rank0)
    if s.step == 0 and not s.history:  # (a run preempted in its first step resumes with its step-0 record)
        progress.phase("evaluating the start checkpoint")
        s.history.append({"step": 0, **s.evaluate()})
        _log(s, s.history[-1])
    budget = PreemptionBudget("rl", s.rank0)  # (the signal lead vs measured step-to-boundary + save times)
    while s.step < stop:
        progress.phase(f"step {s.step + 1}: generate, reward, train, sync")
        t_step = time.perf_counter()
        try:
            rec = {"step": s.step + 1, **rl_step(s, s.step)}
        except Preempted as e:  # inside the generate phase: the state is still step s.step's
            t0 = time.perf_counter()
            save_training_state(s.run, s.policy, s.opt, s.sched, recipe, s.step, {"pos": s.step}, s.history,
                                cfg.keep_last, cfg.keep_every)
            if s.rank0:
                print(json.dumps({"preempted_at_step": s.step, "phase": "generate", "detail": str(e),
                                  "save_seconds": round(time.perf_counter() - t0, 2)}), flush=True)
            break
        s.step += 1
        if cfg.eval_interval and s.step % cfg.eval_interval == 0 or s.step == cfg.steps:
            progress.phase(f"step {s.step}: evaluating")
            progress.note(f"evaluating after step {s.step}")
            rec.update(s.evaluate())
        s.history.append(rec)  # (the preemption figures are wall times: logged, not part of the results)
        _log(s, {**rec, **budget.step(time.perf_counter() - t_step - rec.get("time/generate", 0.0))})
        late = budget.out_of_time(time.perf_counter() - t_step) and s.step < stop  # (the job's end is near)
        preempted = flag.agreed() or late
        if preempted or s.step == stop or (cfg.save_interval and s.step % cfg.save_interval == 0) \
                or budget.save_due(cfg.save_every_minutes):
            progress.phase(f"step {s.step}: saving the checkpoint")
            t_save = time.perf_counter()
            save_training_state(s.run, s.policy, s.opt, s.sched, recipe, s.step, {"pos": s.step}, s.history,
                                cfg.keep_last, cfg.keep_every)
            budget.saved(time.perf_counter() - t_save)
        if late:
            budget.request_requeue(s.step)
            break
        if preempted:
            if s.rank0:
                print(json.dumps({"preempted_at_step": s.step}), flush=True)
            break
    progress.close()
    if s.rank0:
        s.tb.close()
        s.pool.close()
        (s.run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in s.history))
    return s.history


def _log(s: RLState, rec: dict) -> None:
    if not s.rank0:
        return
    for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)):
            s.tb.add_scalar(k if "/" in k else f"rl/{k}", v, rec["step"])
    s.tb.flush()
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    figs = {k: rec[k] for k in ("reward/mean", "loss") if k in rec}
    figs.update({k: rec[k] for k in rec if k.startswith("eval/")})
    if rec["step"] > 0:
        s.progress.step(rec["step"], figs)
