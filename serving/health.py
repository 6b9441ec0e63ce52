"""Waiting for a server to answer: SGLang, the CPU OpenAI server and the Gradio demo (``path="/"``); the port a
server bound itself (``serving.openai_server --port 0 --port-file F``)."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def healthy(url: str, timeout: float = 5.0, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 1800.0, path: str = "/health",
                 interval: float = 2.0) -> None:
    """Until ``url + path`` answers 200; fails early when ``proc`` (the server) exits."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server {proc.args} exited with code {proc.returncode} before answering {url}{path}")
        if healthy(url, path=path):
            return
        time.sleep(interval)
    raise TimeoutError(f"server at {url} not answering {path} after {timeout:.0f} s")


def bound_port(port_file: str | Path, proc: subprocess.Popen, interval: float = 0.1) -> int:
    """The port a server started with ``--port 0 --port-file port_file`` listens on, once it writes the file;
    fails as soon as the server exits before that."""
    port_file = Path(port_file)
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server {proc.args} exited with code {proc.returncode} before listening")
        time.sleep(interval)
    return int(port_file.read_text())
