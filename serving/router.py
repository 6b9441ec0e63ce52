"""SGLang's router in front of several rollout servers (``sglang-router``: the Rust model gateway and its launcher;
it imports no sglang, so it runs from the project's environment or from SGLang's own, ``$SGLANG_PYTHON``).

The RL job scripts start one when the rollout has more than one server (``slurm/launch.sh``); the rollout client
then sends every sample's ``/generate`` to it (``rl/sglang_engine.py``), and the weight updates, health checks and
aborts to the servers themselves. Cache-aware routing keeps a prompt's K samples on the server that holds their
shared prefix; the router re-sends a request a server failed with a 5xx and takes a server that keeps failing out of
the rotation until its ``/health`` answers again.

    python -m serving.router --worker-urls URL [URL ...] [--port N] [--print-command]"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
REQUEST_TIMEOUT_S = 14400  # (sglang-router's own default is 1800 s: too short for a 32K-token answer under load)


@dataclass
class SGLangRouter:
    worker_urls: list[str]
    host: str = "127.0.0.1"
    port: int = 30080
    policy: str = "cache_aware"  # a prompt's samples where their prefix is cached; balanced by load past a threshold
    request_timeout_s: int = REQUEST_TIMEOUT_S  # one request = one sample: a 32K-token stage-2 answer, loaded server
    prometheus_port: int | None = None  # its metrics (default: port + 1; the launcher's own default, 29000, is
    # shared by every router on a node and lies in our rendezvous range)
    api_key: str | None = None  # the workers' key (SGLang's --api-key)
    extra: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.worker_urls:
            raise ValueError("router: no worker URLs")
        if self.policy not in POLICIES:
            raise ValueError(f"router policy {self.policy!r}: expected one of {POLICIES}")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, python: str | None = None) -> list[str]:
        python = python or router_python()
        cmd = [python, "-m", "sglang_router.launch_router", "--worker-urls", *[u.rstrip("/") for u in self.worker_urls],
               "--host", self.host, "--port", str(self.port), "--policy", self.policy,
               "--request-timeout-secs", str(self.request_timeout_s),
               "--prometheus-port", str(self.prometheus_port or self.port + 1), "--log-level", "warn"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + list(self.extra)


def router_python() -> str:
    """SGLang's interpreter when it has the router (``$SGLANG_PYTHON``), else this one (the project pins it)."""
    py = os.environ.get("SGLANG_PYTHON")
    if py and subprocess.run([py, "-c", "import sglang_router"], capture_output=True).returncode == 0:
        return py
    return sys.executable


def launch(router: SGLangRouter, log_path: str | None = None, wait: bool = True, timeout: float = 1800.0):
    """Start the router (its own process group; it renames itself ``sglang::router``) and, with ``wait``, wait
    until it lists every worker healthy."""
    log = open(log_path, "a") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(router.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if wait:
        wait_workers(router.url, len(router.worker_urls), proc, timeout)
    return proc


def wait_workers(url: str, n: int, proc=None, timeout: float = 1800.0) -> None:
    """Until the router at ``url`` lists ``n`` healthy workers (``GET /workers``)."""
    import json
    import urllib.request

    from .health import wait_until

    def ready() -> bool:
        try:
            ws = json.loads(urllib.request.urlopen(url + "/workers", timeout=10).read()).get("workers", [])
        except OSError:
            return False
        return sum(bool(w.get("is_healthy")) for w in ws) >= n

    wait_until(ready, proc, timeout, 0.2, f"router exited ({{code}}) before its {n} workers were registered",
               f"router {url}: {n} healthy workers not registered within {timeout:.0f} s")


def main(argv=None) -> int:
    """Run the router in the foreground until SIGTERM (what slurm/launch.sh starts for the RL stages)."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python -m serving.router")
    ap.add_argument("--worker-urls", nargs="+", required=True)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=30080)
    ap.add_argument("--policy", default="cache_aware", choices=POLICIES)
    ap.add_argument("--request-timeout-s", type=int, default=REQUEST_TIMEOUT_S)
    ap.add_argument("--prometheus-port", type=int)
    ap.add_argument("--api-key")
    ap.add_argument("--print-command", action="store_true", help="print the router's command line and exit")
    a = ap.parse_args(argv)
    r = SGLangRouter(a.worker_urls, a.host, a.port, a.policy, a.request_timeout_s, a.prometheus_port, a.api_key)
    if a.print_command:
        print(" ".join(r.command()))
        return 0
    from .sglang import ignore_preemption_warnings

    ignore_preemption_warnings()  # (the trainer's step boundary still needs the router)
    proc = launch(r, wait=False)

    def stop(*_):
        os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
