"""The server rollout engine: SGLang servers on GPUs (launched on the allocation, or attached by URL), or the CPU
servers of ``serving/native.py`` that speak the same native API — one client for both.

- ``generate``: one request per prompt (its K samples, so the server shares the prompt's prefix), spread over all
  servers by least in-flight requests (``inflight`` per server), each sample seeded ``seed + i * K + k`` when the
  servers honour seeds (SGLang only under ``--enable-deterministic-inference``, which ``deterministic`` requires of
  every server: a rerun then reproduces the samples; without it no seed is sent, and SGLang samples anew); a
  server's refusal surfaces with its own message and the prompt; a sample SGLang aborted is an error, never scored.
- ``router``: SGLang's router in front of the servers (``serving/router.py``; the job scripts start one for more
  than one server): every sample is then its own request to it (the router takes one sampling-parameter set per
  request; same seeds, so the same samples), and it balances them, cache-aware, over the servers.
- ``wait_ready``: every server answers ``/health`` before the first request (and the router lists them all).
- ``transport()``: how weights reach the servers (``rl/transport.py``): ``broadcast`` (separate rollout GPUs / CPU
  servers), ``ipc`` (servers colocated on the trainer's GPUs), ``disk`` (the explicit fallback)."""
from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable
from pathlib import Path

from .rollout import Interrupted, Rollout, SamplingParams
from .http import EngineError, get as _get, post

TRANSPORTS = ("broadcast", "ipc", "disk")


def abort_payload() -> dict:  # AbortReq
    return {"abort_all": True}


def generate_payload(prompts: list[list[int]], n: int, sp: SamplingParams, indices: list[int] | None = None,
                     seeded: bool = True) -> dict:
    """Prompts × n samples in one request, sampling parameters per sample: with ``seeded`` (servers under SGLang's
    deterministic inference), sample k of prompt i (``indices``: the prompts' places in the step's batch) is seeded
    ``seed + i * n + k``, so the K samples of a prompt differ, and a rerun reproduces them; else no seed (SGLang
    would ignore it)."""
    indices = list(range(len(prompts))) if indices is None else indices
    ids = [p for p in prompts for _ in range(n)]
    params = [{"temperature": sp.temperature, "top_p": sp.top_p, "max_new_tokens": sp.max_new_tokens,
               "skip_special_tokens": False} for _ in indices for _ in range(n)]
    if seeded:
        for p, seed in zip(params, (sp.seed + i * n + k for i in indices for k in range(n))):
            p["sampling_seed"] = seed
    return {"input_ids": ids, "return_logprob": True, "sampling_params": params}


def sample_payloads(prompt: list[int], n: int, sp: SamplingParams, index: int, seeded: bool = True) -> list[dict]:
    """``generate_payload`` of one prompt as n single-sample requests (what SGLang's router forwards)."""
    body = generate_payload([prompt], n, sp, [index], seeded)
    return [{"input_ids": list(prompt), "return_logprob": True, "sampling_params": p} for p in body["sampling_params"]]


def parse_generate(out: list[dict], prompts: list[list[int]], n: int, tokenizer=None) -> list[Rollout]:
    res = []
    for j, o in enumerate(out):
        i = j // n
        meta = o["meta_info"]
        lps = meta["output_token_logprobs"]  # [(logprob, token_id, text|None), ...]
        ids = o.get("output_ids") or [t[1] for t in lps]
        fr = meta.get("finish_reason") or {}
        if fr.get("type") == "abort":  # SGLang's 200 for a request it aborted (abort_all, its scheduler): cut off
            raise EngineError(f"sample {j} (prompt {i}) was aborted by the server: {fr.get('message')}; "
                              "an aborted generation is not scored or trained on")
        res.append(Rollout(i, list(prompts[i]), list(ids), [float(t[0]) for t in lps],
                           "length" if fr.get("type") == "length" else "stop",
                           text=o.get("text") if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=False)))
    return res


class SGLangEngine:
    def __init__(self, urls: list[str], hf_config: dict, tokenizer=None, transport: str = "broadcast",
                 sync_dir: str | Path | None = None, master_addr: str | None = None, master_port: int | None = None,
                 inflight: int = 8, timeout: float = 14400.0, api_key: str | None = None, group=None,
                 senders: str = "owners", router: str | None = None, deterministic: bool | None = None):
        if not urls:
            raise ValueError("engine sglang: no server URLs (--sglang-urls, or the job script starts them)")
        if transport not in TRANSPORTS:
            raise ValueError(f"weight transport {transport!r}: expected one of {TRANSPORTS}")
        self.urls, self.cfg, self.tok = [u.rstrip("/") for u in urls], hf_config, tokenizer
        self.kind, self.sync_dir, self.addr, self.port = transport, sync_dir, master_addr, master_port
        self.inflight, self.timeout, self.key = inflight, timeout, api_key
        self.busy = {u: 0 for u in self.urls}
        self.lock = threading.Lock()
        self._transport, self.group = None, group  # group: the trainer ranks' gloo group (ipc, disk, broadcast)
        self.senders = senders  # broadcast: every rank holding weights sends its own ("owners"), each pipeline
        # stage's first rank its stage's ("stages"), or rank 0 all ("rank0")
        self.router = router.rstrip("/") if router else None  # the samples' requests go there when set
        # True: every server must run SGLang's deterministic inference (seeds sent); False: no seeds; None: seeds
        # sent when every server honours them
        self.deterministic, self._seeded = deterministic, None

    def wait_ready(self, timeout: float = 1800.0) -> None:
        """Every server answers ``/health`` (and the router lists them); a server the job script saw end
        (``MEGATRON_RING_SERVER_STATUS``) fails this at once with the end of its log."""
        import os

        from serving.health import ended_servers, wait_healthy

        status = os.environ.get("MEGATRON_RING_SERVER_STATUS")
        for u in self.urls:
            wait_healthy(u, timeout=timeout, died=lambda: ended_servers(status))
        if self.router:
            from serving.router import wait_workers

            wait_workers(self.router, len(self.urls), timeout=timeout)
        self.seeded()

    def _info(self, u: str) -> dict:
        return _get(u + "/server_info", self.timeout, self.key)  # (SGLang's /get_server_info is deprecated)

    def seeded(self) -> bool:
        """Whether the samples get seeds: the servers' ``enable_deterministic_inference`` (``/server_info``) against
        what the recipe asks (``deterministic``); a server without it when it is required is refused."""
        if self._seeded is None:
            if self.deterministic is False:
                self._seeded = False
            else:
                off = [u for u in self.urls if not self._info(u).get("enable_deterministic_inference")]
                if off and self.deterministic:
                    raise EngineError(f"{', '.join(off)}: running without --enable-deterministic-inference, so "
                                      "SGLang ignores the samples' seeds, while the recipe asks for reproducible "
                                      "rollouts (stages.rl.deterministic_rollouts: true): restart the server(s) "
                                      "with the flag, or set deterministic_rollouts: false")
                self._seeded = not off
                if off:
                    print(f"[rollout] {', '.join(off)}: no deterministic inference: samples are not reproducible "
                          "(no seeds sent)", flush=True)
        return self._seeded

    def health(self) -> bool:
        from serving.health import healthy

        return all(healthy(u) for u in self.urls)

    def _pick(self) -> str:
        with self.lock:
            u = min(self.urls, key=lambda x: self.busy[x])
            self.busy[u] += 1
            return u

    def _one(self, i: int, prompt: list[int], n: int, sp: SamplingParams, k: int | None = None) -> list[Rollout]:
        """Prompt i's n samples (or, through the router, its sample k alone)."""
        try:
            if k is not None:
                out = [post(self.router + "/generate", sample_payloads(prompt, n, sp, i, self.seeded())[k],
                            self.timeout, self.key)]
            else:
                u = self._pick()
                try:
                    out = post(u + "/generate", generate_payload([prompt], n, sp, [i], self.seeded()), self.timeout,
                               self.key)
                finally:
                    with self.lock:
                        self.busy[u] -= 1
        except EngineError as e:
            raise EngineError(f"prompt {i}{'' if k is None else f' sample {k}'} ({len(prompt)} tokens, max_new_tokens "
                              f"{sp.max_new_tokens}): {e}") from None
        rs = parse_generate(out, [prompt], len(out) if k is not None else n, self.tok)
        for r in rs:
            r.prompt_index = i
        return rs

    def generate(self, prompts: list[list[int]], n: int, sp: SamplingParams,
                 should_stop: Callable[[], bool] | None = None) -> list[Rollout]:
        """One request per prompt (its K samples), at most ``inflight`` per server; through the router one per
        sample, at most ``inflight`` prompts' worth per server. ``should_stop`` turning true ends the wait: requests
        not yet sent are dropped, the ones in flight are left to the servers (preemption stops them with the job),
        and ``Interrupted`` is raised."""
        per = range(n) if self.router else [None]
        ex = ThreadPoolExecutor(min(len(self.urls) * self.inflight * len(per), 1024))
        try:
            futs = [ex.submit(self._one, i, p, n, sp, k) for i, p in enumerate(prompts) for k in per]
            pending = set(futs)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()  # (a failed request: its error, at once)
                if pending and should_stop is not None and should_stop():
                    self.abort()
                    raise Interrupted(f"generation stopped with {len(pending)} of {len(futs)} requests unanswered")
            return [r for f in futs for r in f.result()]
        finally:
            ex.shutdown(wait=False, cancel_futures=True)

    def load_from_disk(self, hf_dir: str | Path, version: int = 0) -> None:
        """Every server loads the HF folder ``hf_dir`` (``/update_weights_from_disk``; a path the servers can read)."""
        from .transport import disk_payload, post_all

        post_all(self.urls, "/update_weights_from_disk", disk_payload(Path(hf_dir).resolve(), version), self.timeout,
                 self.key)

    def abort(self) -> None:
        """Every server drops the requests it is running or holding (SGLang's ``/abort_request``); best effort."""
        for u in self.urls:
            try:
                post(u + "/abort_request", abort_payload(), 30, self.key)
            except EngineError as e:
                print(f"[rollout] {u}: abort refused ({e})", flush=True)

    def server_tp_sizes(self) -> list[int]:
        """Each server's tensor-parallel size (its ranks in the weight-update group)."""
        out = []
        for u in self.urls:
            info = self._info(u)
            out.append(int(info.get("tp_size") or 1))
        return out

    def transport(self):
        from .transport import BroadcastTransport, DiskTransport, IPCTransport

        if self._transport is None:
            if self.kind == "broadcast":
                self._transport = BroadcastTransport(self.urls, self.server_tp_sizes(), self.addr,
                                                     self.port or _free_port(), timeout=self.timeout, api_key=self.key,
                                                     group=self.group if self.senders != "rank0" else None,
                                                     by_stage=self.senders == "stages")
            elif self.kind == "ipc":
                self._transport = IPCTransport(self.urls, max(self.server_tp_sizes()), self.timeout, self.key,
                                               self.group)
            else:
                self._transport = DiskTransport(self.urls, self.sync_dir or "weight_sync", self.cfg, self.timeout,
                                                self.key, self.group)
        return self._transport

    def before_training(self) -> None:
        """Colocated servers give their GPU memory back while the trainer trains."""
        if self.kind == "ipc":
            self.transport().release_memory()


def sync_rendezvous(rank: int) -> tuple[str | None, int | None]:
    """Trainer rank ``rank``'s rendezvous for its weight-update group with the servers: port
    ``MEGATRON_RING_SYNC_PORT`` + rank on its own host, rank 0 included (the job scripts set the port; torchrun's
    c10d rendezvous puts rank 0 on the node whose name sorts first, gpu10 before gpu9, not on the allocation's first
    host); without one, no address (the transport takes ``reachable_address``) and a free port (None)."""
    import os
    import socket

    port = int(os.environ.get("MEGATRON_RING_SYNC_PORT", 0))
    if not port:
        return None, None
    return socket.gethostname(), port + rank


def peer_transport(kind: str, sync_dir: str | Path, hf_config: dict, group, senders: str = "owners"):
    """The part of the weight transport ``kind`` that the trainer ranks other than 0 run (rank 0's is the engine's
    ``transport()``; collective with it): the disk transport's shard writer, the IPC transport's per-GPU serializer,
    the broadcast transport's sender of this rank's own weights (``senders`` "owners"; ``sync_rendezvous``);
    else None."""
    import torch.distributed as dist

    from .transport import BroadcastTransport, DiskTransport, IPCTransport

    if kind == "disk":
        return DiskTransport([], sync_dir, hf_config, group=group)
    if kind == "ipc":
        return IPCTransport(None, None, group=group)
    if kind == "broadcast" and senders != "rank0":
        addr, port = sync_rendezvous(dist.get_rank())
        return BroadcastTransport(None, None, addr, port or _free_port(), group=group, by_stage=senders == "stages")
    return None


def reachable_address(urls: list[str]) -> str:
    """The address the servers reach this process at for the weight-update rendezvous: 127.0.0.1 when they all run
    here; else the address of the interface that routes to them (a server told 127.0.0.1 would wait for itself
    until SGLang's 30-minute group timeout)."""
    import socket
    from urllib.parse import urlsplit

    hosts = {urlsplit(u).hostname for u in urls}
    if all(h in ("127.0.0.1", "localhost", "::1") for h in hosts):
        return "127.0.0.1"
    host = sorted(h for h in hosts if h not in ("127.0.0.1", "localhost", "::1"))[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # (no packet is sent: only the route is looked up)
        try:
            s.connect((host, 9))
        except OSError as e:
            raise EngineError(f"weight-update rendezvous: no route to the server host {host!r} ({e}); run under "
                              "the job scripts (MEGATRON_RING_SYNC_PORT: each rank at its own host name)") from None
        return s.getsockname()[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
