"""SGLang for Ring-lite / Ling-lite (GPU only): the launch command line, a health wait, and shutdown.
Used by the RL rollout engine (``megatron_ring.rl.sglang_engine``) and by ``slurm/serve.sh``."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from .health import wait_healthy


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
    enable_memory_saver: bool = False  # RL colocated with the trainer: release/resume memory between phases
    extra: list[str] = field(default_factory=list)

    def command(self, python: str = sys.executable) -> list[str]:
        cmd = [python, "-m", "sglang.launch_server", "--model-path", self.model_path, "--host", self.host,
               "--port", str(self.port), "--tp-size", str(self.tp_size), "--trust-remote-code", "--dtype", self.dtype]
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
        return cmd + list(self.extra)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def launch(server: SGLangServer, log_path: str | None = None, wait: bool = True) -> subprocess.Popen:
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(server.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ))
    if wait:
        wait_healthy(server.url, proc)
    return proc


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
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--ep-size", type=int, default=1)
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--context-length", type=int)
    ap.add_argument("--mem-fraction-static", type=float)
    ap.add_argument("--reasoning-parser")
    ap.add_argument("--api-key")
    ap.add_argument("--served-model-name")
    ap.add_argument("--enable-memory-saver", action="store_true")
    ap.add_argument("--print-command", action="store_true", help="print the sglang command line and exit")
    a = ap.parse_args(argv)
    srv = SGLangServer(**{k: v for k, v in vars(a).items() if k != "print_command"})
    if a.print_command:
        print(" ".join(srv.command()))
        return 0
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
