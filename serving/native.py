"""The CPU rollout server: the part of SGLang's native API that the RL rollout engine uses, over an HF folder.

So that ``megatron-ring rl`` with ``engine: sglang`` runs on a CPU through exactly the client code that drives
SGLang on a GPU cluster (``rl/sglang_engine.py`` + ``rl/transport.py``):

- ``POST /generate``: ``input_ids`` (one or a batch), ``sampling_params`` (one or one per sample: temperature,
  top_p, max_new_tokens, sampling_seed, skip_special_tokens), ``return_logprob`` → SGLang's answer shape
  (``text``, ``output_ids``, ``meta_info.output_token_logprobs`` / ``finish_reason`` / ``weight_version``).
  Sampling is the shared decoding core (``megatron_ring/hf/decoding.py``: continuous batching, the samples of all
  requests in flight decoded together, up to ``--max-batch``), each sample from its own ``sampling_seed`` (as the
  in-process engine draws it) only under ``--enable-deterministic-inference``, as SGLang (without it: fresh
  randomness). A request ended by ``/abort_request`` is a 200 whose ``finish_reason`` is SGLang's
  ``{"type": "abort", ...}`` with what it had generated.
- ``POST /init_weights_update_group``, ``/update_weights_from_distributed`` (the broadcast transport: the trainer's
  rank 0 broadcasts each tensor on a gloo group made as SGLang makes it), ``/update_weights_from_disk``,
  ``/update_weights_from_tensor`` (the IPC transport: shared memory from a trainer on the same machine); as in SGLang
  0.5.23 the last two only inside a weight-update session (``/begin_weight_update`` … ``/end_weight_update``; a 400
  with SGLang's message otherwise, before joining any broadcast), ``/flush_cache`` (SGLang's plain-text body; a 400
  while requests run, ``?timeout=`` waits for idle), ``/release_memory_occupation``, ``/resume_memory_occupation``
  (SGLang's memory tags kept: a release while a request runs, or a resume of a tag that is not released, fails
  SGLang's scheduler, and the whole server dies; a /generate while a tag is released is refused here, where SGLang
  would read unmapped memory), ``/health``, ``/get_model_info``, ``/server_info``. The texts are in
  ``serving/sglang_protocol.py``.
- A prompt + ``max_new_tokens`` beyond ``--context-length`` is a 400, as SGLang answers; ``--context-length``
  beyond the model's ``max_position_embeddings`` is refused at start unless SGLang's own override
  ``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1`` is set.

Request bodies are checked field by field (unknown fields are a 400): the field names are SGLang's (the pinned
release's request classes, tests/data/sglang_api.json), so the two servers cannot drift apart unnoticed.

    python -m serving.native --model-path runs/tiny/export --port 0 --port-file F
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import threading
from pathlib import Path

import torch
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .sglang_protocol import (ABORTED, FLUSH_FAILED, FLUSH_TIMED_OUT, FLUSHED, MEMORY_TAGS, NO_SESSION_OPEN,
                              NOT_IDLE_RELEASE, SESSION_OPEN, AbortReq, BeginReq, DiskReq, DistributedReq, EndReq,
                              GenerateReq, InitGroupReq, MemoryReq, Sampling, TensorReq, outside_session)


def _in_turn(method):
    """A weight request waits for the one before it: SGLang's scheduler runs them one at a time (an init blocks it
    until the rendezvous), so several senders' requests are served in turn, never side by side."""
    import functools

    @functools.wraps(method)
    def run(self, req):
        with self.weight_ops:
            return method(self, req)
    return run


class Server:
    def __init__(self, model_path: str, context_length: int | None = None, max_batch: int = 64,
                 deterministic: bool = False):
        from megatron_ring.convert.hf_io import read_hf_state
        from megatron_ring.rl.rollout import InProcessEngine
        from megatron_ring.tokenizer.tiny import load_tokenizer

        cfg = json.loads((Path(model_path) / "config.json").read_text())
        positions = int(cfg.get("max_position_embeddings") or 0)
        self.context = int(context_length or positions)
        if positions and self.context > positions and os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN") != "1":
            raise SystemExit(f"--context-length {self.context} is longer than the model's max_position_embeddings "
                             f"{positions} ({model_path}/config.json); SGLang refuses it the same way unless "
                             "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1")
        tok = load_tokenizer(model_path) if (Path(model_path) / "tokenizer.json").exists() else None
        from megatron_ring.hf.decoding import Scheduler

        self.engine = InProcessEngine(cfg, tok, max_batch)
        self.engine.update_weights(read_hf_state(model_path), 0)
        self.model_path, self.version, self.max_batch = model_path, "default", max_batch
        self.core = Scheduler(self.engine.model, self.engine.pad, max_batch)
        self.inflight: set = set()  # the sequences of the /generate requests being answered (for /abort_request)
        self.weight_ops = threading.Lock()  # one weight request at a time (as SGLang's scheduler runs them)
        self.served = 0  # /generate requests answered (in /get_server_info)
        self.groups: dict[str, object] = {}
        self.session = False  # a weight-update session is open (SGLang 0.5.23 refuses updates outside one)
        self.deterministic = deterministic  # --enable-deterministic-inference: seeds honoured
        self.entropy = random.SystemRandom()  # (the seeds of samples without one that counts)
        self.released: set[str] = set()  # SGLang's offload_tags

    # --- generation ------------------------------------------------------------------------------------------
    def generate(self, req: GenerateReq):
        single = bool(req.input_ids) and isinstance(req.input_ids[0], int)
        ids = [req.input_ids] if single else req.input_ids
        sps = req.sampling_params if isinstance(req.sampling_params, list) else [req.sampling_params or Sampling()] * len(ids)
        if len(sps) != len(ids):
            raise ValueError(f"{len(sps)} sampling_params for {len(ids)} inputs")
        for j, (p, s) in enumerate(zip(ids, sps)):
            if len(p) + s.max_new_tokens > self.context:
                raise ValueError(f"Requested token count exceeds the model's maximum context length of "
                                 f"{self.context} tokens. You requested a total of {len(p) + s.max_new_tokens} tokens: "
                                 f"{len(p)} tokens from the input messages and {s.max_new_tokens} tokens for the "
                                 f"completion (input {j}).")
        from megatron_ring.hf.decoding import Seq
        from megatron_ring.rl.rollout import as_rollout

        if self.released:
            raise ValueError(f"memory released ({sorted(self.released)}) and not resumed: SGLang would generate from "
                             "unmapped GPU memory (the CPU look-alike refuses)")
        if not ids:
            return []
        eos, left, all_done = self.engine.eos, [len(ids)], threading.Event()

        def done(_):
            left[0] -= 1
            if left[0] == 0:
                all_done.set()
        seqs = [Seq(list(p), s.max_new_tokens, s.temperature, s.top_p,
                    s.sampling_seed if self.deterministic and s.sampling_seed is not None
                    else self.entropy.randrange(1 << 62), frozenset([eos]), on_done=done, tag=j)
                for j, (p, s) in enumerate(zip(ids, sps))]
        self.inflight.update(seqs)
        try:
            for q in seqs:
                self.core.submit(q)
            all_done.wait()
        finally:
            self.inflight.difference_update(seqs)
        if any(q.error is not None for q in seqs):
            raise next(q.error for q in seqs if q.error is not None)
        out = [self._answer(as_rollout(q, self.engine.tok, eos), req.return_logprob, q.finish == "cancelled")
               for q in seqs]
        self.served += 1
        return out[0] if single else out

    def _answer(self, r, logprob: bool, aborted: bool = False) -> dict:
        fin = (dict(ABORTED) if aborted else {"type": "stop", "matched": r.response_ids[-1]}
               if r.finish_reason == "stop" else {"type": "length", "length": len(r.response_ids)})
        meta = {"finish_reason": fin, "prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.response_ids),
                "weight_version": self.version}
        if logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(r.logprobs, r.response_ids)]
        return {"text": r.text, "output_ids": r.response_ids, "meta_info": meta}

    # --- weights -----------------------------------------------------------------------------------------------
    @_in_turn
    def begin_session(self, req: BeginReq) -> dict:
        if self.session:
            raise ValueError(SESSION_OPEN)
        self.session = True
        return {"success": True, "message": "Success"}

    @_in_turn
    def end_session(self, req: EndReq) -> dict:
        if not self.session:
            raise ValueError(NO_SESSION_OPEN)
        self.session = False
        return {"success": True, "message": "Success"}

    def flush(self, timeout: float) -> bool:
        """SGLang flushes only when no request runs or waits; ``timeout``: wait that long for it."""
        import time

        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def release(self, req: MemoryReq) -> None:
        if not self.idle():  # SGLang's scheduler asserts idleness; its failure kills the server
            _scheduler_died(f"AssertionError: {NOT_IDLE_RELEASE}")
        self.released.update(req.tags or MEMORY_TAGS)

    def resume(self, req: MemoryReq) -> None:
        for tag in req.tags or MEMORY_TAGS:
            if tag not in self.released:  # (SGLang: offload_tags.remove(tag), a KeyError in the scheduler)
                _scheduler_died(f"KeyError: {tag!r} (resume_memory_occupation of a tag that is not released)")
            self.released.discard(tag)

    def idle(self) -> bool:
        return not (self.inflight or self.core.running or self.core.waiting)

    @_in_turn
    def init_group(self, req: InitGroupReq) -> dict:
        from megatron_ring.rl.transport import custom_process_group

        if req.backend != "gloo":
            raise ValueError(f"backend {req.backend!r}: the CPU server joins gloo groups only")
        self.groups[req.group_name] = custom_process_group("gloo", req.master_address, req.master_port,
                                                          req.world_size, req.rank_offset, req.group_name)
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    @_in_turn
    def update_distributed(self, req: DistributedReq) -> dict:
        import torch.distributed as dist

        if not self.session:  # refused before joining the broadcast (the sender's wait ends on this answer)
            raise ValueError(outside_session("update_weights_from_distributed"))
        if req.group_name not in self.groups:
            raise ValueError(f"Group {req.group_name} not in {list(self.groups)}. Please call "
                             "`init_weights_update_group` first.")
        ts = [self._empty(s, getattr(torch, d)) for d, s in zip(req.dtypes, req.shapes)]
        works = [dist.broadcast(t, src=0, group=self.groups[req.group_name], async_op=True) for t in ts]
        for w in works:  # (received before the lock: a broadcast must not wait for a running generation)
            w.wait()
        with self.core.exclusive():
            self._load(list(zip(req.names, ts)), req.weight_version)
        return {"success": True, "message": "Succeeded to update parameter online."}

    @_in_turn
    def update_tensor(self, req: TensorReq) -> dict:
        """Tensors shared by a colocated trainer (entry 0: this server's one TP rank)."""
        import base64
        import io
        import pickle

        import torch.multiprocessing  # noqa: F401 (registers torch's rebuild functions for the unpickler)

        if not self.session:
            raise ValueError(outside_session("update_weights_from_tensor"))
        if req.load_format is not None:
            raise ValueError(f"load_format {req.load_format!r}: the CPU server loads named tensors only")
        named = pickle.load(io.BytesIO(base64.b64decode(req.serialized_named_tensors[0])))
        with self.core.exclusive():
            self._load([(n, t) for n, t in named], req.weight_version)
        return {"success": True, "message": "Succeeded to update model weights."}

    @_in_turn
    def update_disk(self, req: DiskReq) -> dict:
        from megatron_ring.convert.hf_io import read_hf_state

        state = read_hf_state(req.model_path)
        with self.core.exclusive():
            self._load(list(state.items()), req.weight_version)
            self.model_path = req.model_path
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def _empty(self, shape, dtype) -> torch.Tensor:  # (a receive buffer; the benchmark's sink reuses them)
        return torch.empty(shape, dtype=dtype)

    def _load(self, named, version) -> None:
        params = dict(self.engine.model.named_parameters())
        bad = [n for n, t in named if n not in params or params[n].shape != t.shape]
        if bad:  # SGLang's loader would skip unknown names silently; a CPU server says so
            raise ValueError(f"unknown or mis-shaped weight(s): {bad[:4]}")
        with torch.no_grad():
            for n, t in named:
                params[n].copy_(t)
        if version is not None:
            self.version = version


def create_app(server: Server) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return JSONResponse({"success": False, "message": f"invalid request: {exc.errors()}"}, status_code=400)

    async def run(fn, *args):
        try:
            return JSONResponse(await asyncio.to_thread(fn, *args))
        except ValueError as e:
            return JSONResponse({"success": False, "message": str(e)}, status_code=400)

    @app.get("/health")
    @app.get("/health_generate")
    async def health():
        return JSONResponse({})

    @app.get("/get_model_info")
    async def info():
        return JSONResponse({"model_path": server.model_path, "weight_version": server.version,
                             "context_length": server.context, "is_generation": True})

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():  # (ServerArgs' flat fields, as SGLang's, and the look-alike's own count)
        return JSONResponse({"tp_size": 1, "context_length": server.context, "model_path": server.model_path,
                             "weight_version": server.version, "generate_requests": server.served,
                             "enable_deterministic_inference": server.deterministic})

    for path, fn, model in (("/generate", server.generate, GenerateReq),
                            ("/init_weights_update_group", server.init_group, InitGroupReq),
                            ("/update_weights_from_distributed", server.update_distributed, DistributedReq),
                            ("/update_weights_from_tensor", server.update_tensor, TensorReq),
                            ("/update_weights_from_disk", server.update_disk, DiskReq),
                            ("/begin_weight_update", server.begin_session, BeginReq),
                            ("/end_weight_update", server.end_session, EndReq)):
        app.post(path)(_handler(run, fn, model))

    @app.post("/abort_request")
    async def abort(req: AbortReq):
        if req.abort_all:  # every request in flight or waiting ends (its answer: finish_reason abort)
            for q in list(server.inflight):
                q.cancelled.set()
        return JSONResponse({})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(timeout: float = Query(0.0, ge=0.0)):  # SGLang's plain-text answer, 400 unless idle
        ok = await asyncio.to_thread(server.flush, timeout)
        return Response(FLUSHED if ok else (FLUSH_TIMED_OUT if timeout > 0 else FLUSH_FAILED),
                        status_code=200 if ok else 400)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release(req: MemoryReq):
        return JSONResponse(await asyncio.to_thread(server.release, req))  # (SGLang's answer: null)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume(req: MemoryReq):
        return JSONResponse(await asyncio.to_thread(server.resume, req))

    return app


def _scheduler_died(why: str) -> None:
    """What SGLang does when its scheduler raises: the error in the log, SIGQUIT to the server, every process gone
    (the request that caused it gets no answer)."""
    import sys

    print(f"Scheduler hit an exception: {why}\n[look-alike] the server exits, as SGLang's does",
          file=sys.stderr, flush=True)
    os._exit(1)


def _handler(run, fn, model):
    """A route that validates its body as ``model`` (SGLang's request class) and answers ``fn(body)``."""
    async def handler(req):
        return await run(fn, req)
    handler.__annotations__ = {"req": model}
    return handler


def main(argv=None) -> int:
    from .openai_server import _exit_with, serve

    ap = argparse.ArgumentParser(prog="python -m serving.native", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True, help="an HF folder (megatron-ring export / convert mcore-to-hf)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000, help="0: a free port (see --port-file)")
    ap.add_argument("--port-file", help="write the bound port here once the socket is listening")
    ap.add_argument("--context-length", type=int, help="default: the model's max_position_embeddings")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--enable-deterministic-inference", action="store_true",
                    help="honour each sample's sampling_seed (SGLang's flag of the same name)")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    a = ap.parse_args(argv)
    if a.parent_pid:
        _exit_with(a.parent_pid)
    torch.set_num_threads(a.threads)
    app = create_app(Server(a.model_path, a.context_length, a.max_batch, a.enable_deterministic_inference))
    serve(app, a.host, a.port, a.port_file, f"serving {a.model_path} (SGLang native API subset) on "
                                            f"http://{a.host}:{{port}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
