"""Training state shared by the SFT and RL trainers: atomic checkpoints (written to ``iter_N.tmp``, renamed,
then the ``latest`` pointer moved) holding model, optimizer, scheduler, RNG and the data position, exact
restore, and the preemption flag (SIGTERM/SIGUSR1 -> checkpoint at the next step boundary)."""
from __future__ import annotations

import os
import shutil
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
                        history: list) -> Path:
    """Collective. Everything goes to ``iter_N.tmp`` first; rank 0 renames it and moves ``latest``."""
    rank = dist.get_rank()
    final = run / "checkpoints" / f"iter_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    save_checkpoint(model, tmp, recipe.hf_config, iteration=step, parallel=recipe.parallel.sizes(),
                    extra={**position, "recipe": recipe.name, "history": history}, optimizer=optimizer)
    torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step, **position},
               tmp / f"trainer_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (run / "checkpoints" / "latest.tmp").write_text(final.name + "\n")
        os.replace(run / "checkpoints" / "latest.tmp", run / "checkpoints" / "latest")
    dist.barrier()
    return final


def latest_checkpoint(run: str | Path) -> Optional[Path]:
    p = Path(run) / "checkpoints" / "latest"
    return p.parent / p.read_text().strip() if p.exists() else None


def load_training_state(ckpt: Path, model, optimizer, scheduler) -> tuple[dict, dict]:
    """(this rank's trainer state, the checkpoint metadata) after restoring model, optimizer, scheduler, RNG."""
    meta = load_checkpoint(model, ckpt, optimizer=optimizer)
    ts = torch.load(ckpt / f"trainer_rank{dist.get_rank():05d}.pt", weights_only=False)
    scheduler.load_state_dict(ts["scheduler"])
    _set_rng_state(ts["rng"])
    return ts, meta


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm preemption, ``scancel``, torchrun forwarding) ask for a checkpoint at the
    next step boundary; the ranks agree on it with one all-reduce per step."""

    def __init__(self):
        import signal

        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        from ..parallel.dist import all_reduce_floats

        return bool(all_reduce_floats([float(self.requested)], op="max")[0])
