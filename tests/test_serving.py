"""Serving: an exported training checkpoint served by the CPU OpenAI-compatible server, driven by the official
``openai`` client (parity with ``model.generate``, reasoning split, bad requests), a loopback load test, and the
Gradio demo in a real headless Chromium."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from openai import OpenAI

from .conftest import PY, ROOT, cli, free_port, teach_tiny

sys.path.insert(0, str(ROOT))
from benchmarks.serve_load import run_load, table  # noqa: E402
from serving.health import bound_port, wait_healthy  # noqa: E402
from serving.reasoning import ReasoningStream, split_reasoning  # noqa: E402

KEY = "test-key"
ARTIFACTS = ROOT / "tests" / "_artifacts"
CHATS = [  # what the model is taught (a long-CoT reply with <think>…</think>, like the SFT data)
    ("What is 15 + 730?", "<think>\nWe add 15 and 730.\nones: 5 + 0 = 5.\ntens: 1 + 3 = 4.\n</think>\nThe answer is \\boxed{745}."),
    ("Solve 2x = 8.", "<think>\nDivide both sides by 2: x = 4.\n</think>\nSo x = \\boxed{4}."),
    ("Say hello.", "Hello!"),
]


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """A tiny model taught three replies, exported as a servable folder (see conftest.teach_tiny)."""
    return teach_tiny(tiny, CHATS, tmp_path_factory.mktemp("served"))


def _reference(export: Path, question: str, max_new: int = 96) -> str:
    """The exported model's own greedy ``generate()`` reply, decoded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    m = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = m.generate(**ids, max_new_tokens=max_new, do_sample=False, top_k=0)
    new = [t for t in out[0, ids["input_ids"].shape[1]:].tolist() if t != tok.eos_token_id]
    return tok.decode(new, skip_special_tokens=False)


def _start_server(served: Path, d: Path, *args) -> dict:
    """The CPU server on a port it binds itself (``--port 0``), told back through ``--port-file``."""
    port_file = d / "port"
    proc = subprocess.Popen([PY, "-m", "serving.openai_server", "--model", str(served), "--port", "0",
                             "--port-file", str(port_file), "--served-model-name", "ring-tiny", "--api-key", KEY,
                             "--threads", "1", *args], cwd=ROOT)
    url = f"http://127.0.0.1:{bound_port(port_file, proc)}"  # written once the socket listens
    wait_healthy(url, proc, timeout=120, interval=0.3)
    return {"url": url, "proc": proc}


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    s = _start_server(served, tmp_path_factory.mktemp("srv"), "--max-tokens-limit", "256")
    yield s
    s["proc"].terminate()
    s["proc"].wait(30)


def _client(server, key=KEY):
    return OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def test_reasoning_parser_streams_like_whole_text():
    text = "<think>\nstep one\nstep two\n</think>\nThe answer is 4."
    for cut in (1, 2, 3, 5, 7):
        p, r, c = ReasoningStream(), "", ""
        for i in range(0, len(text), cut):
            a, b = p.feed(text[i:i + cut])
            r, c = r + a, c + b
        a, b = p.close()
        assert (r + a, c + b) == ("\nstep one\nstep two\n", "\nThe answer is 4."), cut
    # SGLang's deepseek-r1 rule (tests/test_sglang_parts.py runs it): no </think>, all reasoning
    assert split_reasoning("no tags here") == ("no tags here", "")
    assert split_reasoning("<think>cut off while thinking") == ("cut off while thinking", "")


def test_openai_client_replies_equal_greedy_generate(server, served):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["ring-tiny"]
    for q, taught in CHATS:
        ref = _reference(served, q)
        assert ref == taught, "the exported model lost what it was taught"
        want_r, want_c = split_reasoning(ref, strip=False)
        r = c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                      max_tokens=96)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop"
        assert msg.content == want_c and (msg.reasoning_content or None) == want_r
        got_r, got_c, n = "", "", 0
        for ch in c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": q}],
                                            temperature=0, max_tokens=96, stream=True):
            if ch.choices:
                d = ch.choices[0].delta
                got_r += getattr(d, "reasoning_content", None) or ""
                got_c += d.content or ""
                n += 1
        assert (got_r, got_c) == ((msg.reasoning_content or ""), msg.content)
        assert n > 5, "the reply was not streamed in pieces"
    # the raw text (no splitting) is the model's text exactly
    r = c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": CHATS[0][0]}],
                                  temperature=0, max_tokens=96, extra_body={"separate_reasoning": False})
    assert r.choices[0].message.content == CHATS[0][1]
    # max_tokens cuts the reply: finish_reason "length"
    r = c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": CHATS[0][0]}],
                                  temperature=0, max_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def _raw(server, body: bytes, key=KEY) -> tuple[int, dict]:
    req = urllib.request.Request(server["url"] + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    good = {"model": "ring-tiny", "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0,
            "max_tokens": 8}
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({**good, "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({**good, "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({**good, "messages": "hello"}).encode(), 400, "messages"),
        (json.dumps({**good, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
        (json.dumps({**good, "model": "gpt-4"}).encode(), 404, "does not exist"),
        (json.dumps({**good, "max_tokens": 100000}).encode(), 400, "exceeds this server's limit 256"),
        (json.dumps({**good, "n": 3}).encode(), 400, "n: Input should be less than or equal to 1"),
        (json.dumps({k: v for k, v in good.items() if k != "messages"}).encode(), 400, "messages"),
    ]
    for body, status, words in cases:
        code, err = _raw(server, body)
        assert code == status, (body, code, err)
        assert words in err["error"]["message"], (body, err)
        assert _raw(server, json.dumps(good).encode())[0] == 200, "the server stopped serving after a bad request"
    code, err = _raw(server, json.dumps(good).encode(), key="wrong")
    assert code == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").models.list()
    assert server["proc"].poll() is None


def test_stop_strings_cut_the_reply_streamed_or_not(server):
    """OpenAI's ``stop``: the reply ends before the first stop string (not included), finish_reason "stop", the
    same text streamed; a stop string that never occurs changes nothing."""
    q, taught = CHATS[0]
    c = _client(server)
    for stop, want in ((["ones"], taught[:taught.index("ones")]), ("\\boxed", taught[:taught.index("\\boxed")]),
                       (["never said"], taught)):
        raw = {"separate_reasoning": False}  # the text as generated (the stop cuts inside the reasoning)
        r = c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                      max_tokens=96, stop=stop, extra_body=raw)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop", (stop, r)
        parts = c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                          max_tokens=96, stop=stop, stream=True, extra_body=raw)
        chunks = [ch for ch in parts if ch.choices]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def _until(pred, what: str, timeout: float = 60.0):
    t0 = time.time()
    while not pred():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def _hold(url: str):
    """A streaming chat that takes the server's one slot: 1500 tokens (``ignore_eos``, SGLang's parameter), several
    seconds on the CPU; returns the open connection after its first chunk (the generation is running)."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "ring-tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "temperature": 1.0, "seed": 7, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")

    class Held:
        @staticmethod
        def close():  # the client goes away: FIN on the socket itself (the response object still holds it)
            import socket

            conn.sock.shutdown(socket.SHUT_RDWR)
            resp.close()
            conn.close()

    return Held


def test_queue_limit_503_stream_disconnect_and_eval_retries(served, tmp_path):
    """A server with a queue of 1: while a stream holds the slot, another request is refused with 503 (and
    counted); the eval client retries it with backoff and succeeds once the holder disconnects; a disconnected
    stream stops its generation early and frees the slot (/health counts it as abandoned). Event-driven: each
    step waits for the server's counters, not for time to pass."""
    from megatron_ring.eval.runner import EndpointRefused, EvalConfig, _one

    srv = _start_server(served, tmp_path, "--max-queue", "1", "--max-tokens-limit", "1500")
    url = srv["url"]
    good = {"model": "ring-tiny", "messages": [{"role": "user", "content": "Say hello."}], "temperature": 0,
            "max_tokens": 8}
    try:
        held = _hold(url)
        assert _health(url)["inflight"] == 1
        code, err = _raw(srv, json.dumps(good).encode())
        assert code == 503 and "server busy" in err["error"]["message"] and _health(url)["rejected"] == 1
        held.close()  # the client goes away mid-stream
        _until(lambda: _health(url)["inflight"] == 0, "the disconnected stream to free its slot")
        # its generation stops at the next token, before the 1500 it was asked for (the worker counts a generation
        # as abandoned only when it was cancelled, when generate() returns)
        _until(lambda: _health(url)["abandoned"] == 1, "the generation to notice the disconnect")
        assert _raw(srv, json.dumps(good).encode())[0] == 200

        cfg = EvalConfig(base_url=url + "/v1", model="ring-tiny", api_key=KEY, retries=4, max_tokens=8,
                         temperature=0.0)
        row = {"id": "hello", "prompt": "Say hello."}

        async def retried():
            import openai

            client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=KEY, max_retries=0, timeout=60)
            held = _hold(url)
            task = asyncio.create_task(_one(client, cfg, row, 0))
            rejected = _health(url)["rejected"]
            while _health(url)["rejected"] == rejected:  # the first attempt got its 503
                await asyncio.sleep(0.05)
            held.close()
            return await task

        out = asyncio.run(retried())
        assert out["response"] == "Hello!" and "error" not in out, out
        with pytest.raises(EndpointRefused, match="404"):  # 4xx: a configuration error, not retried
            asyncio.run(_one(openai.AsyncOpenAI(base_url=cfg.base_url, api_key=KEY, max_retries=0),
                             EvalConfig(base_url=cfg.base_url, model="gpt-4", retries=4), row, 0))
    finally:
        srv["proc"].terminate()
        srv["proc"].wait(30)


def test_load_concurrent_chats_no_failures(server):
    r = asyncio.run(run_load(server["url"] + "/v1", chats=6, turns=2, max_tokens=24, api_key=KEY,
                             time_limit_s=240))
    print("\n" + table(r))
    assert r["failed"] == 0, r["errors"]
    assert r["requests"] == 12 and r["latency_p50"] > 0


def test_percentiles():
    from benchmarks.serve_load import pct

    assert pct([5.0, 1.0, 4.0, 2.0, 3.0], 50) == 3.0 and pct([5.0, 1.0, 4.0, 2.0, 3.0], 99) == 5.0
    assert pct([float(i) for i in range(1, 101)], 90) == 90.0 and pct([], 50) != pct([], 50)  # nan


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (scripts/test.sh installs it)")
def test_gradio_demo_in_headless_chromium(server, served):
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = dict(os.environ, OPENAI_API_KEY=KEY, GRADIO_ANALYTICS_ENABLED="False")
    ui = subprocess.Popen([PY, "-m", "serving.chat_ui", "--endpoint", server["url"] + "/v1", "--port", str(port),
                           "--temperature", "0", "--max-tokens", "96"], cwd=ROOT, env=env)
    q, taught = CHATS[0]
    want_r, want_c = split_reasoning(taught)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", ui, timeout=180, path="/", interval=0.3)
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
            page = b.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            box = page.locator("#chat-input textarea")
            box.wait_for(timeout=60000)
            box.fill(q)
            box.press("Enter")
            # the answer "The answer is \\boxed{745}." arrives and its box is rendered by KaTeX (the TeX source is
            # kept in KaTeX's MathML annotation)
            page.wait_for_selector("#chatbot .katex", timeout=120000)
            bot = page.locator("#chatbot")
            text = bot.inner_text()
            assert want_c.split("\\boxed")[0] in text and "Thinking" in text, text
            tex = [t.strip() for t in page.locator("#chatbot .katex annotation").all_text_contents()]
            assert "\\boxed{745}" in tex, tex
            assert page.locator("#chatbot .katex .boxpad, #chatbot .katex .fbox, #chatbot .katex .stretchy").count() \
                or page.locator("#chatbot .katex-html").count(), "KaTeX drew nothing"
            page.get_by_text("Thinking", exact=True).first.click()  # open the collapsible panel: the reasoning is inside
            page.wait_for_function("(w) => document.querySelector('#chatbot').innerText.includes(w)",
                                   arg=want_r.splitlines()[0], timeout=10000)
            assert want_r.splitlines()[-1] in bot.inner_text()
            page.screenshot(path=str(ARTIFACTS / "chat_ui.png"), full_page=True)
            b.close()
        assert (ARTIFACTS / "chat_ui.png").stat().st_size > 10_000
    finally:
        ui.terminate()
        ui.wait(30)


def test_chat_ui_reports_a_down_endpoint():
    import gradio as gr

    from serving.chat_ui import build_demo

    import socket

    with socket.socket() as s:  # bound, never listening: connections to it are refused (no port handed out)
        s.bind(("127.0.0.1", 0))
        demo = build_demo(f"http://127.0.0.1:{s.getsockname()[1]}/v1", temperature=0)
        with pytest.raises(gr.Error, match="not reachable"):
            list(demo.fn("hi", [], "", 0.0, 1.0, 16))


def _sse_server(events: list[str]):
    """A tiny HTTP server whose /v1/chat/completions streams ``events`` (SSE data lines) and /v1/models one model."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                           "owned_by": "x"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for e in events:
                self.wfile.write(f"data: {e}\n\n".encode())
            self.wfile.flush()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _chunk(content: str) -> str:
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]})


def test_chat_ui_sends_back_what_the_model_wrote_and_reports_an_error_inside_the_stream():
    """The next turn carries the model's own answer (not the display's $-wrapped math, stripped); an error the
    server sends inside the stream (SGLang: an abort, a failed step) is a clear gr.Error."""
    import gradio as gr

    from serving.chat_ui import build_demo, history_to_messages, stream_reply

    raw = "<think>\n7\n</think>\nThe answer is \\boxed{7}.\n"
    srv = _sse_server([_chunk(raw[:9]), _chunk(raw[9:]), "[DONE]"])
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        raw_of: dict = {}
        turn = list(stream_reply(openai.OpenAI(base_url=url, api_key="x", max_retries=0), "m",
                                 [{"role": "user", "content": "q"}], 0.0, 1.0, 16, raw_of))[-1]
        assert turn[-1].content == "The answer is $\\boxed{7}$."  # displayed with math markup
        history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": turn[0].content,
                                                      "metadata": {"title": "Thinking"}},
                   {"role": "assistant", "content": turn[-1].content}]
        assert history_to_messages(history, "", raw_of)[-1] == {"role": "assistant",
                                                                "content": "\nThe answer is \\boxed{7}.\n"}
    finally:
        srv.shutdown()
    err = json.dumps({"error": {"message": "Request aborted: out of memory", "type": "server_error", "code": 500}})
    srv = _sse_server([_chunk("<think>\npartial"), err])
    try:
        demo = build_demo(f"http://127.0.0.1:{srv.server_address[1]}/v1", temperature=0)
        with pytest.raises(gr.Error, match="failed during the reply: Request aborted: out of memory"):
            list(demo.fn("hi", [], "", 0.0, 1.0, 16))
    finally:
        srv.shutdown()
