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
                 interval: float = 2.0) -> None:
    """Until ``url + path`` answers 200; fails early when ``proc`` (the server) exits."""
    wait_until(lambda: healthy(url, path=path), proc, timeout, interval,
               f"server {proc.args if proc else None} exited with code {{code}} before answering {url}{path}",
               f"server at {url} not answering {path} after {timeout:.0f} s")


def bound_port(port_file: str | Path, proc: subprocess.Popen, interval: float = 0.1) -> int:
    """The port a server started with ``--port 0 --port-file port_file`` listens on, once it writes the file;
    fails as soon as the server exits before that."""
    port_file = Path(port_file)
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args} exited with code {proc.returncode} before listening")
        time.sleep(interval)
    return int(port_file.read_text())
