"""The CPU default server: the OpenAI chat API (the subset SGLang serves) over an exported HF folder.

``transformers serve`` (transformers 5) cannot load a remote-code architecture such as ``BailingMoeForCausalLM``
(it looks the class up on the ``transformers`` module), so this thin FastAPI server does what it lacks:
``GET /v1/models``, ``POST /v1/chat/completions`` (streaming or not; ``reasoning_content`` split from the answer as
SGLang's ``--reasoning-parser deepseek-r1`` does), ``GET /health``, an optional API key, and limits (prompt and
``max_tokens`` against the context, a bounded queue). Requests are decoded together by the shared core
(``megatron_ring/hf/decoding.py``: continuous batching, up to ``--max-batch`` running, the rest waiting up to
``--max-queue`` in all; more get a 503): a request joins the running batch at a token boundary and leaves when done
(eos, a stop string, max tokens, the client gone). Greedy replies equal ``model.generate`` token for token; a
sampled reply depends on its ``seed`` only, not on what else runs beside it. Bad requests get a 4xx in OpenAI's
error shape; a failing generation is a 500 for the requests in that step only.

    python -m serving.openai_server --model runs/tiny/export --port 8000 [--api-key KEY]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from .openai_schema import APIError, APIKey, BodyLimit, ChatRequest, Message, errors, without_422
from .reasoning import ReasoningStream, split_reasoning


# --- the model -------------------------------------------------------------------------------------------------
@dataclass
class Limits:
    max_tokens: int = 2048  # the largest max_tokens a request may ask for
    max_queue: int = 64  # requests waiting or running; more get 503
    request_timeout_s: float = 600.0


class ChatModel:
    """An exported HF folder (``trust_remote_code``) behind the continuous-batching decoder."""

    def __init__(self, path: str, dtype: str = "float32", max_batch: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from megatron_ring.hf.decoding import Scheduler

        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                          dtype=getattr(torch, dtype)).eval()
        try:
            self.gen = GenerationConfig.from_pretrained(path)
        except OSError:
            self.gen = GenerationConfig()
        eos = self.gen.eos_token_id if self.gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.context = int(getattr(self.model.config, "max_position_embeddings", 4096))
        pad = self.model.config.pad_token_id
        self.core = Scheduler(self.model, pad if pad is not None else min(self.eos), max_batch)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        msgs = []
        for m in messages:
            text = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)


class Decoder:
    """Token ids → text deltas (decode the whole reply each time; hold back an unfinished UTF-8 sequence),
    cut at the first stop string. Special tokens are dropped, as SGLang's default ``skip_special_tokens`` does (the
    reasoning tags of an export are plain added tokens: they stay)."""

    def __init__(self, tok, eos: set[int], stop: list[str]):
        self.tok, self.eos, self.stop = tok, eos, stop
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, t: int) -> str:
        if t in self.eos or self.stopped:
            return ""
        self.ids.append(t)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                text, self.stopped = text[:i], True
        # hold back an ending that may be the start of a stop string ("\\" before "boxed"): sent text is final
        hold = 0 if self.stopped else max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                                          default=0)
        safe = len(text) - hold
        delta, self.sent = text[self.sent:safe], max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """At the end of the generation: what was held back (no stop string completed)."""
        if self.stopped or not self.ids:
            return ""
        text = self.tok.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta


# The decoding thread takes the GIL back between torch ops; with Python's default 5 ms switch interval it waits up to
# 5 ms for the event loop each time (a decode step of 8 chats takes ~6 ms): hand the GIL over sooner.
SWITCH_INTERVAL_S = 0.0005


# --- the app -----------------------------------------------------------------------------------------------------
def create_app(model: ChatModel, served_name: str, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="megatron-ring CPU server", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit)
    if api_key:
        app.add_middleware(APIKey, key=api_key)
    without_422(app)
    auth = (401,) if api_key else ()
    state = {"inflight": 0, "rejected": 0, "abandoned": 0}  # abandoned: stopped early, the client had gone
    relay = _Relay()
    model.core.after_step.append(relay.flush)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if errs and errs[0].get("type") == "json_invalid":
            return APIError(400, f"request body is not valid JSON: {errs[0].get('ctx', {}).get('error', '')}").response()
        e = errs[0] if errs else {}
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        return APIError(400, f"{loc or 'body'}: {e.get('msg', 'invalid request')}", param=loc or None).response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.get("/health")
    async def health():
        return {"status": "ok", **state, "running": model.core.running, "waiting": len(model.core.waiting),
                "max_batch": model.core.max_batch, "peak_running": model.core.peak}

    @app.get("/v1/models", responses=errors(*auth))
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": 0,
                                            "owned_by": "megatron-ring", "max_model_len": model.context}]}

    @app.post("/v1/chat/completions", responses=errors(400, *auth, 404, 413, 500, 503))
    async def chat(req: ChatRequest, request: Request):
        if req.model != served_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {served_name!r}",
                           param="model", code="model_not_found")
        ids = model.prompt_ids(req.messages)
        room = model.context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the context is {model.context}", param="messages",
                           code="context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > limits.max_tokens:
            raise APIError(400, f"max_tokens {asked} exceeds this server's limit {limits.max_tokens}", param="max_tokens")
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens {asked} + prompt {len(ids)} tokens exceeds the context {model.context}",
                           param="max_tokens", code="context_length_exceeded")
        if state["inflight"] >= limits.max_queue:
            state["rejected"] += 1
            raise APIError(503, f"server busy: {state['inflight']} requests queued (limit {limits.max_queue})",
                           "server_error")
        max_new = asked or min(limits.max_tokens, room)
        temperature = req.temperature if req.temperature is not None else float(model.gen.temperature or 1.0)
        top_p = req.top_p if req.top_p is not None else float(model.gen.top_p or 1.0)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        run = _Run(model, ids, max_new, temperature, top_p, req.seed, stop, state, req.ignore_eos)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        relay.loop = asyncio.get_running_loop()
        run.start(relay)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(run, rid, created, served_name, req.separate_reasoning, usage, request),
                                     media_type="text/event-stream")
        try:
            text = "".join([d async for d in run.deltas(limits.request_timeout_s)])
        except Exception as e:  # noqa: BLE001 — one failed generation must not take the server down
            raise APIError(500, f"generation failed: {e}", "server_error") from e
        msg = {"role": "assistant", "content": text, "refusal": None}  # (OpenAI's schema requires refusal)
        if req.separate_reasoning:  # exactly what the stream of the same reply carries
            reasoning, answer = split_reasoning(text, strip=False)
            msg = {"role": "assistant", "content": answer, "refusal": None, "reasoning_content": reasoning}
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_name,
                "choices": [{"index": 0, "message": msg, "finish_reason": run.finish, "logprobs": None}],
                "usage": run.usage()}

    return app


class _Relay:
    """Text deltas from the decoding thread to the event loop: collected during a step, handed over once after it
    (one wake-up of the loop per step, not one per token and request). ``loop``: the server's, set by each request."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.items, self.lock = [], threading.Lock()

    def put(self, q: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((q, item))

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        if items:
            self.loop.call_soon_threadsafe(_deliver, items)


def _deliver(items) -> None:
    for q, item in items:
        q.put_nowait(item)


class _Run:
    """One request in the decoding core; its text deltas handed to the event loop through a queue."""

    def __init__(self, model: ChatModel, ids, max_new, temperature, top_p, seed, stop, state, ignore_eos=False):
        from megatron_ring.hf.decoding import Seq

        self.model, self.ids, self.state = model, ids, state
        self.dec = Decoder(model.tok, set() if ignore_eos else model.eos, stop)
        self.seq = Seq(list(ids), max_new, temperature, top_p, seed, frozenset() if ignore_eos else frozenset(model.eos))
        self.cancelled = self.seq.cancelled
        self.finish, self.error = "stop", None

    def start(self, relay: _Relay):
        self.q: asyncio.Queue = asyncio.Queue()
        self.state["inflight"] += 1

        def on_token(t):  # (the decoding thread)
            d = self.dec.push(t)
            if self.dec.stopped:
                self.cancelled.set()  # leaves the batch at this token
            if d:
                relay.put(self.q, d)

        def on_done(seq):
            if seq.error is not None:
                self.error = seq.error
            else:
                rest = self.dec.flush()
                if rest:
                    relay.put(self.q, rest)
                self.finish = "length" if seq.finish == "length" and not self.dec.stopped else "stop"
                if seq.finish == "cancelled" and not self.dec.stopped:
                    self.state["abandoned"] += 1
            relay.put(self.q, None)

        self.seq.on_token, self.seq.on_done = on_token, on_done
        self.model.core.submit(self.seq)

    async def deltas(self, timeout: float):
        try:
            while True:
                d = await asyncio.wait_for(self.q.get(), timeout)
                if d is None:
                    break
                yield d
            if self.error is not None:
                raise self.error
        finally:
            self.cancelled.set()
            self.state["inflight"] -= 1

    def usage(self) -> dict:
        n = len(self.dec.ids) + (1 if self.seq.finish == "stop" and not self.dec.stopped else 0)  # (+ the eos)
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}


async def _sse(run: _Run, rid, created, name, separate: bool, usage: bool, request: Request):
    def chunk(delta: dict, finish=None, **extra) -> str:
        return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                   "logprobs": None}], **extra}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    parser = ReasoningStream() if separate else None
    checked = time.monotonic()
    try:
        async for d in run.deltas(3600.0):
            if time.monotonic() - checked > 0.1:  # (a client gone is noticed within 0.1 s, not asked every token)
                checked = time.monotonic()
                if await request.is_disconnected():
                    break
            r, c = parser.feed(d) if parser else ("", d)
            if r:
                yield chunk({"reasoning_content": r})
            if c:
                yield chunk({"content": c})
        if parser:
            r, c = parser.close()
            if r:
                yield chunk({"reasoning_content": r})
            if c:
                yield chunk({"content": c})
        yield chunk({}, run.finish)
        if usage:
            yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                         "model": name, "choices": [], "usage": run.usage()}) + "\n\n"
    except Exception as e:  # noqa: BLE001 — report in-band; the server stays up
        yield "data: " + json.dumps({"error": {"message": f"generation failed: {e}", "type": "server_error"}}) + "\n\n"
    yield "data: [DONE]\n\n"


def _exit_with(pid: int, every: float = 2.0) -> None:
    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
                return
            except PermissionError:
                pass
            time.sleep(every)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.openai_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an exported HF folder (megatron-ring export)")
    ap.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: a free port the server binds itself (see --port-file)")
    ap.add_argument("--port-file", help="write the bound port here once the socket is listening")
    ap.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/*")
    ap.add_argument("--max-tokens-limit", type=int, default=2048)
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; more get a 503")
    ap.add_argument("--max-batch", type=int, default=16, help="requests decoded together (continuous batching)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default). 1: the decoding thread leaves the other cores to the "
                         "event loop and the clients (benchmarks/serve_load.py: 1.4x the throughput of torch's default "
                         "at 8 concurrent chats on 2 cores)")
    ap.add_argument("--parent-pid", type=int, help="exit when this process is gone (a server started for one run "
                                                   "must not outlive a run that was killed)")
    a = ap.parse_args(argv)
    if a.parent_pid:
        _exit_with(a.parent_pid)
    if a.threads:
        torch.set_num_threads(a.threads)
    import sys
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    model = ChatModel(a.model, max_batch=a.max_batch)
    name = a.served_model_name or Path(a.model).resolve().name
    app = create_app(model, name, a.api_key, Limits(max_tokens=a.max_tokens_limit, max_queue=a.max_queue))
    serve(app, a.host, a.port, a.port_file, f"serving {a.model} as {name!r} on http://{a.host}:{{port}}/v1")
    return 0


def serve(app, host: str, port: int, port_file: str | None, banner: str) -> None:
    """Run ``app`` on a socket bound here, before anyone is told the port (``port`` 0: a free one, written to
    ``port_file`` once listening): no window for another process to take it."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    port = sock.getsockname()[1]
    print(banner.format(port=port), flush=True)
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(port_file)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    raise SystemExit(main())
