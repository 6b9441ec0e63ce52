"""SGLang for Ring-lite / Ling-lite (GPU only): the launch command line, a health wait, and shutdown.
Used by the RL job scripts (rollout servers), ``eval --serve`` and ``slurm/serve.sh``.

SGLang pins its own torch / transformers: it runs from its own environment, ``$SGLANG_PYTHON`` (a venv or a
container's python; default: this interpreter). The context is checked before launch: a ``--context-length``
beyond the model's ``max_position_embeddings`` is refused unless asked for (``allow_beyond_positions``), which
then sets SGLang's own ``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .health import wait_healthy


def _config(model_path: str) -> dict | None:
    """The exported folder's ``config.json`` (None where there is none, e.g. a command line printed for a path)."""
    cfg = Path(model_path) / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def _heads(model_path: str) -> tuple[int, int] | None:
    c = _config(model_path)
    if c is None:
        return None
    heads = int(c["num_attention_heads"])
    return heads, int(c.get("num_key_value_heads") or heads)


def tp_fits(tp: int, heads: int, kv_heads: int) -> bool:
    """SGLang 0.5.23's rules for a tensor-parallel size (``srt/models/bailing_moe.py``, the attention's
    constructor): ``total_num_heads % attn_tp_size == 0``, and the KV heads split evenly when there are at least as
    many as the size (``total_kv_heads % attn_tp_size == 0``), else are replicated evenly (``attn_tp_size %
    total_kv_heads == 0``)."""
    return heads % tp == 0 and (kv_heads % tp == 0 if kv_heads >= tp else tp % kv_heads == 0)


def fit_tp(model_path: str, gpus: int, asked: int | None = None) -> int:
    """The tensor-parallel size to serve ``model_path`` with on ``gpus`` GPUs: ``asked`` when SGLang accepts it
    (else a ValueError with the numbers), by default the largest size up to ``gpus`` that SGLang accepts (the tiny
    model's 4 heads on an 8-GPU node: 4)."""
    hk = _heads(model_path)
    if asked is not None:
        if hk and not tp_fits(asked, *hk):
            raise ValueError(f"--tp-size {asked} does not divide the model's {hk[0]} attention heads / {hk[1]} KV "
                             f"heads ({model_path}/config.json): SGLang would stop at model construction; sizes that "
                             f"fit: {[t for t in range(1, max(gpus, asked) + 1) if tp_fits(t, *hk)]}")
        return asked
    if not hk:
        return max(gpus, 1)
    return max(t for t in range(1, max(gpus, 1) + 1) if tp_fits(t, *hk))


@dataclass
class SGLangServer:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    tp_size: int = 1
    ep_size: int = 1
    dp_size: int = 1
    context_length: int | None = None  # Ring-lite: 32768
    mem_fraction_static: float | None = None
    reasoning_parser: str | None = None  # "deepseek-r1" splits <think>...</think> into reasoning_content
    api_key: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    enable_memory_saver: bool = False  # RL colocated with the trainer only: release/resume memory between phases
    # (it also turns off SGLang's KV sizing after CUDA-graph capture: a smaller KV pool on dedicated GPUs)
    enable_deterministic_inference: bool = False  # RL with reproducible rollouts: SGLang honours sampling_seed
    # only under this flag (slower; it constrains the attention and sampling backends)
    allow_beyond_positions: bool = False  # a context longer than the config's max_position_embeddings
    extra: list[str] = field(default_factory=list)

    def check_context(self) -> None:
        """Refuse, before anything starts, a context the model's positions do not cover (unless allowed)."""
        c = _config(self.model_path)
        if not self.context_length or c is None:
            return
        pos = int(c.get("max_position_embeddings") or 0)
        if pos and self.context_length > pos and not self.allow_beyond_positions:
            raise ValueError(f"--context-length {self.context_length} exceeds max_position_embeddings {pos} of "
                             f"{self.model_path}/config.json: lower it, or allow it explicitly (--allow-beyond-positions; RoPE extrapolates, "
                             "as Ring-lite's RL did at 24K/32K tokens with a 16,384-position config)")

    def env(self) -> dict:
        env = dict(os.environ)
        if self.allow_beyond_positions:
            env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
        return env

    def served_dtype(self) -> str:
        """``dtype`` "auto" is the export's own ``torch_dtype`` (SGLang's "auto" serves float32 checkpoints, the
        tiny recipes', in float16: not what they were trained in)."""
        c = _config(self.model_path)
        if self.dtype != "auto" or c is None:
            return self.dtype
        return str(c.get("torch_dtype") or c.get("dtype") or "auto")

    def command(self, python: str | None = None) -> list[str]:
        python = python or os.environ.get("SGLANG_PYTHON") or sys.executable
        cmd = [python, "-m", "sglang.launch_server", "--model-path", self.model_path, "--host", self.host,
               "--port", str(self.port), "--tp-size", str(self.tp_size), "--trust-remote-code", "--dtype", self.served_dtype()]
        if self.ep_size > 1:
            cmd += ["--ep-size", str(self.ep_size)]
        if self.dp_size > 1:
            cmd += ["--dp-size", str(self.dp_size)]
        if self.context_length:
            cmd += ["--context-length", str(self.context_length)]
        if self.mem_fraction_static:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.reasoning_parser:
            cmd += ["--reasoning-parser", self.reasoning_parser]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.enable_memory_saver:
            cmd += ["--enable-memory-saver"]
        if self.enable_deterministic_inference:
            cmd += ["--enable-deterministic-inference"]
        return cmd + list(self.extra)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def ignore_preemption_warnings() -> None:
    """A rollout server (or router) of a job outlives the job's warning signals: USR1/USR2 (what sbatch's
    --signal and submitit send ahead of the end, to every step under submitit) ask the *trainer* to checkpoint at
    its step boundary, which needs the servers for that step's weight sync. Ignored here, and so in SGLang itself
    (an ignored signal stays ignored across exec); SIGTERM still stops the server."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def launch(server: SGLangServer, log_path: str | None = None, wait: bool = True) -> subprocess.Popen:
    """Start SGLang; its output goes to ``log_path``, or without one to this process's own stdout/stderr (the job's
    log). ``wait``: until healthy; a server that exits first raises with the last lines of its log."""
    server.check_context()
    log = open(log_path, "ab") if log_path else None
    proc = subprocess.Popen(server.command(), stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True, env=server.env())
    if wait:
        wait_with_log(server.url, proc, log_path)
    return proc


def wait_with_log(url: str, proc: subprocess.Popen, log_path: str | None, **kw) -> None:
    """``wait_healthy``; when the server exits or never answers, the error carries its log's last 40 lines."""
    try:
        wait_healthy(url, proc, **kw)
    except (RuntimeError, TimeoutError) as e:
        if not log_path:
            raise
        tail = Path(log_path).read_text(errors="replace").splitlines()[-40:] if Path(log_path).exists() else []
        raise type(e)(f"{e}\n--- the last lines of {log_path}:\n" + "\n".join(tail)) from e


def shutdown(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's process group (it has scheduler/detokenizer children), SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(argv=None) -> int:
    """``python -m serving.sglang --model-path P [--port N --tp-size T ...]``: run one server in the
    foreground until SIGTERM (what slurm/serve.sh and slurm/rl_stage*.sh start on each node)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m serving.sglang")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--tp-size", default="1", help="a size, or auto: the largest up to --gpus that divides the "
                                                  "model's heads as SGLang requires")
    ap.add_argument("--gpus", type=int, default=1, help="the GPUs of this node (for --tp-size auto)")
    ap.add_argument("--ep-size", type=int, default=1)
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--context-length", type=int)
    ap.add_argument("--mem-fraction-static", type=float)
    ap.add_argument("--reasoning-parser")
    ap.add_argument("--api-key")
    ap.add_argument("--served-model-name")
    ap.add_argument("--enable-memory-saver", action="store_true")
    ap.add_argument("--enable-deterministic-inference", action="store_true")
    ap.add_argument("--dtype", default="auto", help="auto: the export's own torch_dtype")
    ap.add_argument("--allow-beyond-positions", action="store_true",
                    help="a --context-length longer than the model's max_position_embeddings")
    ap.add_argument("--print-command", action="store_true", help="print the sglang command line and exit")
    a = ap.parse_args(argv)
    args = {k: v for k, v in vars(a).items() if k not in ("print_command", "gpus")}
    try:
        args["tp_size"] = fit_tp(a.model_path, a.gpus, None if a.tp_size == "auto" else int(a.tp_size))
        srv = SGLangServer(**args)
        srv.check_context()
    except ValueError as e:
        print(f"serving.sglang: {e}", file=sys.stderr)
        return 2
    if a.print_command:
        print(" ".join(srv.command()))
        return 0
    ignore_preemption_warnings()
    proc = launch(srv, wait=False)
    signal.signal(signal.SIGTERM, lambda *_: shutdown(proc))
    try:
        wait_healthy(f"http://127.0.0.1:{srv.port}", proc)
        print(f"sglang healthy at {srv.url}", flush=True)
        return proc.wait()
    finally:
        shutdown(proc)


if __name__ == "__main__":
    sys.exit(main())
