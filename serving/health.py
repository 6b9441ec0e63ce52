"""Waiting for a server to answer: SGLang, the CPU OpenAI server and the Gradio demo (``path="/"``)."""
from __future__ import annotations

import subprocess
import time
import urllib.request


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
