"""Serving: an exported training checkpoint served by the CPU OpenAI-compatible server, driven by the official
``openai`` client (parity with ``model.generate``, reasoning split, bad requests), a loopback load test, and the
Gradio demo in a real headless Chromium."""
import asyncio
import json
import os
import shutil
import subprocess
import sys
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
from serving.health import wait_healthy  # noqa: E402
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


@pytest.fixture(scope="module")
def server(served):
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "serving.openai_server", "--model", str(served), "--port", str(port),
                             "--served-model-name", "ring-tiny", "--api-key", KEY, "--max-tokens-limit", "256",
                             "--threads", "1"], cwd=ROOT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=120, interval=0.3)
        yield {"url": f"http://127.0.0.1:{port}", "proc": proc}
    finally:
        proc.terminate()
        proc.wait(30)


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
        assert (r + a, c + b) == ("step one\nstep two\n", "The answer is 4."), cut
    assert split_reasoning("no tags here") == (None, "no tags here")
    assert split_reasoning("<think>cut off while thinking") == ("cut off while thinking", "")


def test_openai_client_replies_equal_greedy_generate(server, served):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["ring-tiny"]
    for q, taught in CHATS:
        ref = _reference(served, q)
        assert ref == taught, "the exported model lost what it was taught"
        want_r, want_c = split_reasoning(ref)
        r = c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                      max_tokens=96)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop"
        assert msg.content == want_c
        assert (msg.reasoning_content.strip() if msg.reasoning_content else None) == want_r
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
            page.wait_for_function("(w) => document.querySelector('#chatbot').innerText.includes(w)", arg=want_c,
                                   timeout=120000)
            bot = page.locator("#chatbot")
            text = bot.inner_text()
            assert want_c in text and "Thinking" in text, text
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

    demo = build_demo(f"http://127.0.0.1:{free_port()}/v1", temperature=0)
    with pytest.raises(gr.Error, match="not reachable"):
        list(demo.fn("hi", [], "", 0.0, 1.0, 16))
