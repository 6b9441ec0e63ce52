"""Waiting for a server to answer: SGLang, the CPU OpenAI server and the Gradio demo (``path="/"``); the port a
server bound itself (``serving.openai_server --port 0 --port-file F``)."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable


def healthy(url: str, timeout: float = 5.0, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen | None, timeout: float, interval: float,
               exited: str, late: str) -> None:
    """Until ``ready()``; a RuntimeError (``exited``, with the exit code) as soon as ``proc`` exits, a TimeoutError
    (``late``) after ``timeout`` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(exited.format(code=proc.returncode))
        if ready():
            return
        time.sleep(interval)
    raise TimeoutError(late)


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 1800.0, path: str = "/health",
                 interval: float = 2.0, died: Callable[[], str | None] | None = None) -> None:
    """Until ``url + path`` answers 200; fails early when ``proc`` (the server) exits, or ``died()`` says why the
    server is gone (a server started elsewhere: ``ended_servers``)."""
    def ready() -> bool:
        why = died() if died else None
        if why:
            raise RuntimeError(f"server at {url} is gone before answering {path}: {why}")
        return healthy(url, path=path)

    wait_until(ready, proc, timeout, interval,
               f"server {proc.args if proc else None} exited with code {{code}} before answering {url}{path}",
               f"server at {url} not answering {path} after {timeout:.0f} s")


def ended_servers(status_dir: str | Path | None, tail: int = 3000) -> str | None:
    """The job scripts' record of rollout servers that ended (``sglang-<host>.exit``: the exit status, beside
    ``sglang-<host>.log``: SGLang's own output): which ended, with what, and the end of its log; None when none."""
    if not status_dir:
        return None
    ended = sorted(Path(status_dir).glob("sglang-*.exit"))
    if not ended:
        return None
    f = ended[0]
    log = f.with_suffix(".log")
    text = log.read_text(errors="replace")[-tail:] if log.exists() else "(no log)"
    return (f"the rollout server on {f.stem.removeprefix('sglang-')} exited with status {f.read_text().strip()}; "
            f"the end of its log ({log}):\n{text}")


def bound_port(port_file: str | Path, proc: subprocess.Popen, interval: float = 0.1) -> int:
    """The port a server started with ``--port 0 --port-file port_file`` listens on, once it writes the file;
    fails as soon as the server exits before that."""
    port_file = Path(port_file)
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args} exited with code {proc.returncode} before listening")
        time.sleep(interval)
    return int(port_file.read_text())
