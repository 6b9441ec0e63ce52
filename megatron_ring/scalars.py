"""Where a run's numbers go, and what a person watching it sees.

``Scalars``: TensorBoard always (``<run>/tb``), Weights & Biases beside it when asked (``--wandb-project P``; off by
default; ``--wandb-mode offline`` or ``WANDB_MODE=offline`` writes ``<run>/wandb/offline-run-*`` without network,
``wandb sync`` uploads it later) — the same tags at the same steps in both. It has SummaryWriter's
``add_scalar / flush / close``, so code that writes to TensorBoard writes to both.

``Progress``: one line per interval as it happens (stdout, flushed: a log file fills as the run goes), with step,
elapsed, ETA and the stage's key figure, and a heartbeat line when a long phase (evaluation, a checkpoint save)
has printed nothing for a while."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


class Scalars:
    def __init__(self, run: Path, wandb_project: str | None = None, wandb_mode: str | None = None,
                 config: dict | None = None, name: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run) / "tb"))
        self.wb, self._step, self._row = None, None, {}
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("--wandb-project needs the wandb package (pip install 'megatron-ring[wandb]')") from e
            mode = wandb_mode or os.environ.get("WANDB_MODE") or "online"
            self.wb = wandb.init(project=wandb_project, dir=str(run), name=name or Path(run).name, config=config,
                                 mode=mode, settings=wandb.Settings(silent=True, console="off"))

    def add_scalar(self, tag: str, scalar_value, global_step: int) -> None:
        v = float(scalar_value)
        self.tb.add_scalar(tag, v, global_step)
        if self.wb is not None:
            if self._step is not None and global_step != self._step:
                self._commit()
            self._step = global_step
            self._row[tag] = v

    def _commit(self) -> None:
        if self._row:
            self.wb.log(self._row, step=self._step)
        self._row = {}

    def flush(self) -> None:
        self.tb.flush()
        if self.wb is not None:
            self._commit()

    def close(self) -> None:
        self.flush()
        self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``[stage] step 50/200 (25%) loss 1.2345 | 1m02s elapsed, eta 3m06s``; the ETA from the mean step time
    since the first step (a resumed run counts from where it resumed)."""

    def __init__(self, stage: str, total: int, start: int = 0, every_s: float = 10.0, heartbeat_s: float = 20.0,
                 enabled: bool = True, out=None):
        self.stage, self.total, self.start, self.every_s = stage, total, start, every_s
        self.enabled, self.out = enabled, out or sys.stdout
        self.t0 = self.last = time.monotonic()
        self.phase_name = "starting"
        self._stop = threading.Event()
        self._hb = None
        if enabled and heartbeat_s:
            self._hb = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
            self._hb.start()

    def _print(self, text: str) -> None:
        print(f"[{self.stage}] {text}", file=self.out, flush=True)
        self.last = time.monotonic()

    def phase(self, name: str) -> None:
        self.phase_name = name

    def step(self, step: int, figures: dict) -> None:
        """A line for ``step`` when ``every_s`` passed since the last one (0: every step), and for the last step."""
        if not self.enabled or not (time.monotonic() - self.last >= self.every_s or step >= self.total):
            return
        el = time.monotonic() - self.t0
        done = step - self.start
        eta = el / done * (self.total - step) if done > 0 else float("nan")
        figs = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        pct = 100 * step / max(self.total, 1)
        self._print(f"step {step}/{self.total} ({pct:.0f}%) {figs} | {_hms(el)} elapsed, "
                    f"eta {_hms(eta) if eta == eta else '?'}")

    def note(self, text: str) -> None:
        if self.enabled:
            self._print(text)

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(min(every, 2.0)):
            if time.monotonic() - self.last >= every:
                self._print(f"... {self.phase_name} ({_hms(time.monotonic() - self.t0)} elapsed)")

    def close(self) -> None:
        self._stop.set()
        if self.enabled:
            self._print(f"done in {_hms(time.monotonic() - self.t0)}")
