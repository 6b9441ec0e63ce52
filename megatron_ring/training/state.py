"""Training state shared by the SFT and RL trainers: atomic checkpoints (written to ``iter_N.tmp``, renamed,
then the ``latest`` pointer moved) holding model, optimizer, scheduler, RNG and the data position, exact
restore, and the preemption flag (SIGTERM/SIGUSR1 -> checkpoint at the next step boundary)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config.recipe import Recipe


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    st = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(st["torch"])
    get_cuda_rng_tracker().set_states(st["tracker"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_training_state(run: Path, model, optimizer, scheduler, recipe: Recipe, step: int, position: dict,
                        history: list, keep_last: int = 0, keep_every: int = 0) -> Path:
    """Collective. Everything goes to ``iter_N.tmp`` first; rank 0 renames it and moves ``latest``, then prunes
    older checkpoints (``prune_checkpoints``) when ``keep_last`` is set."""
    rank = dist.get_rank()
    final = run / "checkpoints" / f"iter_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    save_checkpoint(model, tmp, recipe.hf_config, iteration=step, parallel=recipe.parallel.sizes(),
                    extra={**position, "recipe": recipe.name, "history": history,
                           "world_size": dist.get_world_size()}, optimizer=optimizer)
    torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step, **position},
               tmp / f"trainer_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (run / "checkpoints" / "latest.tmp").write_text(final.name + "\n")
        os.replace(run / "checkpoints" / "latest.tmp", run / "checkpoints" / "latest")
        if keep_last:
            prune_checkpoints(run / "checkpoints", keep_last, keep_every)
    dist.barrier()
    return final


def prune_checkpoints(ckpts: Path, keep_last: int, keep_every: int = 0) -> list[str]:
    """Removes the ``iter_*`` checkpoints that are none of: the newest ``keep_last``, a milestone (iteration a
    multiple of ``keep_every``), or what a pointer file (``latest``, ``selected``) names. Returns what it removed."""
    found = sorted((int(p.name[5:]), p) for p in ckpts.glob("iter_*") if p.is_dir() and p.name[5:].isdigit())
    pinned = {(ckpts / f).read_text().strip() for f in ("latest", "selected") if (ckpts / f).exists()}
    keep = {p.name for _, p in found[-keep_last:]} | pinned
    keep |= {p.name for it, p in found if keep_every and it % keep_every == 0}
    gone = [p.name for _, p in found if p.name not in keep]
    for name in gone:
        shutil.rmtree(ckpts / name, ignore_errors=True)
    return gone


def latest_checkpoint(run: str | Path) -> Optional[Path]:
    p = Path(run) / "checkpoints" / "latest"
    return p.parent / p.read_text().strip() if p.exists() else None


def _layout() -> dict:
    """This job's parallel layout, named as the checkpoint metadata names it (plus the number of ranks)."""
    from megatron.core import parallel_state as ps

    return dict(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
                expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
                expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
                context_parallel_size=ps.get_context_parallel_world_size(), world_size=dist.get_world_size())


def load_training_state(ckpt: Path, model, optimizer, scheduler) -> tuple[dict, dict]:
    """(this rank's trainer state, the checkpoint metadata) after restoring model, optimizer, scheduler, RNG.

    At the layout it was saved with, everything is restored bit-exactly. At another layout (other TP/PP/EP or
    number of ranks) the model and the optimizer's state are resharded, the scheduler and data position come
    from rank 0's file, and each rank's random streams continue from rank 0's (they were per rank)."""
    meta = load_checkpoint(model, ckpt, optimizer=optimizer)
    now = _layout()
    saved = {**meta.get("parallel", {}), "world_size": meta.get("world_size")}
    own = ckpt / f"trainer_rank{dist.get_rank():05d}.pt"
    same = saved == now
    ts = torch.load(own if same else ckpt / "trainer_rank00000.pt", weights_only=False)
    scheduler.load_state_dict(ts["scheduler"])
    if same:
        _set_rng_state(ts["rng"])
    else:
        torch.set_rng_state(ts["rng"]["torch"])
        if dist.get_rank() == 0:
            def fmt(d):
                return (f"TP{d.get('tensor_model_parallel_size')} PP{d.get('pipeline_model_parallel_size')} "
                        f"EP{d.get('expert_model_parallel_size')} ETP{d.get('expert_tensor_parallel_size')} "
                        f"CP{d.get('context_parallel_size')} on {d.get('world_size')} ranks")
            print(f"resuming {ckpt.name} at another layout ({fmt(saved)} -> {fmt(now)}): model and optimizer state "
                  "resharded; per-rank random streams restart from rank 0's", flush=True)
    return ts, meta


class StopFlag:
    """SIGTERM / SIGUSR1 / SIGUSR2 (Slurm preemption, ``scancel``, torchrun forwarding) ask for a checkpoint at the
    next step boundary; the ranks agree on it with one all-reduce per step."""

    def __init__(self):
        import signal

        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):  # (USR2: submitit's preemption signal)
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        from ..parallel.dist import all_reduce_floats

        return bool(all_reduce_floats([float(self.requested)], op="max")[0])


class PreemptionBudget:
    """Whether the job's signal lead leaves time to checkpoint, measured as the run goes: a stop request waits for
    the step boundary (from the last point the flag is looked at: for RL the end of generation, for SFT the start
    of the step) and then for a save. The lead comes from the job script (``MEGATRON_RING_SIGNAL_LEAD``, seconds:
    its ``#SBATCH --signal=…@N``). Every step's record gets ``preempt/needed_s`` (the longest wait so far plus the
    slowest save), ``preempt/unsaved_s`` (the work a crash without a signal would lose now) and ``preempt/lead_s``;
    the first step whose need exceeds the lead prints one warning with the figures."""

    def __init__(self, name: str, rank0: bool):
        lead = os.environ.get("MEGATRON_RING_SIGNAL_LEAD")
        self.lead = float(lead) if lead else None
        self.name, self.rank0, self.warned = name, rank0, False
        self.wait = self.save = self.longest = 0.0
        self.saved_at = time.perf_counter()

    def out_of_time(self, step_s: float) -> bool:
        """Collective: the job ends (``SLURM_JOB_END_TIME``: Slurm's projected end, epoch seconds) before one more
        step and a save would be done — the longest step so far plus the slowest save, with 10 % and 30 s to spare:
        stop at this step boundary, as Megatron-LM's --exit-duration-in-mins does, planned from the job's own end
        (a step on a few nodes can outlast any signal lead). The job script then requeues the job
        (``request_requeue``)."""
        from ..parallel.dist import all_reduce_floats

        self.longest = max(self.longest, step_s)
        end = os.environ.get("SLURM_JOB_END_TIME")
        late = bool(end) and time.time() + 1.1 * (self.longest + self.save) + 30.0 > float(end)
        return bool(all_reduce_floats([float(late)], op="max")[0])

    def request_requeue(self, step: int) -> None:
        """Rank 0, after the checkpoint of a stop planned from the job's end: tell the job script to requeue the job
        (``MEGATRON_RING_REQUEUE_FILE``, which it names; without it, nothing to tell)."""
        f = os.environ.get("MEGATRON_RING_REQUEUE_FILE")
        if self.rank0:
            print(json.dumps({"stopped_for_time_at_step": step, "job_end": os.environ.get("SLURM_JOB_END_TIME")}),
                  flush=True)
            if f:
                Path(f).parent.mkdir(parents=True, exist_ok=True)
                Path(f).write_text(f"{step}\n")

    def saved(self, seconds: float) -> None:
        self.save, self.saved_at = max(self.save, seconds), time.perf_counter()

    def save_due(self, minutes: float) -> bool:
        """Collective: the time cadence (``save_every_minutes``; 0: off) asks for a save — ``minutes`` have passed
        since the last save (or the start) on some rank. Bounds the work a crash without a signal loses, whatever
        the cluster's step time."""
        if not minutes:
            return False
        from ..parallel.dist import all_reduce_floats

        late = time.perf_counter() - self.saved_at >= 60.0 * minutes
        return bool(all_reduce_floats([float(late)], op="max")[0])

    def step(self, wait_s: float) -> dict:
        self.wait = max(self.wait, wait_s)
        need = self.wait + self.save
        out = {"preempt/needed_s": need, "preempt/unsaved_s": time.perf_counter() - self.saved_at}
        if self.lead is not None:
            out["preempt/lead_s"] = self.lead
            if need > self.lead and not self.warned and self.rank0:
                self.warned = True
                print(f"[{self.name}] WARNING: the signal lead ({self.lead:.0f} s) is too short to checkpoint: a stop "
                      f"request waits up to {self.wait:.0f} s for the step boundary and a save took {self.save:.0f} s "
                      f"({need:.0f} s in all): raise the job script's --signal=B:USR1@N (or SIGNAL_LEAD)", flush=True)
        return out
