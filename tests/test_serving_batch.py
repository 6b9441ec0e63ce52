"""The CPU server batches (``megatron_ring/hf/decoding.py``, continuous batching): requests decoded together give
the replies they get one at a time, token for token when greedy; a sampled reply depends on its seed, not on its
neighbours in the batch; past ``--max-batch`` requests wait, past ``--max-queue`` they get a 503 and the server keeps
serving. The tiny random export is enough: the replies are compared with each other, not with taught text."""
import http.client
import json
import threading
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from openai import OpenAI

from .test_serving import KEY, _health, _hold, _raw, _start_server, _until

PROMPTS = ["Hi.", "What is 2 + 2?", "Tell me about the moon, the tides and the sea in a few short words.",
           "x", "Solve 3x + 5 = 20 and explain every step you take along the way, please.", "Name a colour.",
           "A car covers 100 m in 5 s. Its speed in m/s?", "Count to three."]


@pytest.fixture(scope="module")
def batched(tiny, tmp_path_factory):
    s = _start_server(tiny["export"], tmp_path_factory.mktemp("batched"), "--max-batch", "4", "--max-queue", "8",
                      "--max-tokens-limit", "1500")
    yield s
    s["proc"].terminate()
    s["proc"].wait(30)


def _ask(url: str, i: int, temperature: float = 0.0, seed: int | None = None, prompt: str | None = None):
    c = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    r = c.chat.completions.create(model="ring-tiny", messages=[{"role": "user", "content": prompt or PROMPTS[i]}],
                                  temperature=temperature, seed=seed, max_tokens=8 + 8 * i,
                                  extra_body={"separate_reasoning": False, "ignore_eos": True})
    return r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason


def _together(fn, n: int) -> list:
    """``fn(i)`` for i < n, all sent at once (a barrier: none starts before every thread is ready)."""
    gate = threading.Barrier(n)

    def go(i):
        gate.wait()
        return fn(i)
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(go, range(n)))


def test_greedy_replies_batched_equal_one_at_a_time(batched):
    """8 mixed-length prompts and lengths (8..64 tokens), 4 running and 4 joining as others leave."""
    url = batched["url"]
    alone = [_ask(url, i) for i in range(8)]
    assert [n for _, n, _ in alone] == [8 + 8 * i for i in range(8)]
    peak = _health(url)["peak_running"]
    assert peak == 1, "one request at a time ran beside another"
    together = _together(lambda i: _ask(url, i), 8)
    assert together == alone
    assert _health(url)["peak_running"] == 4, "the requests were not decoded together"


def test_a_sampled_reply_depends_on_its_seed_not_on_its_neighbours(batched):
    url = batched["url"]
    q = PROMPTS[2]
    alone = _ask(url, 3, temperature=1.0, seed=7, prompt=q)
    mixed = _together(lambda i: _ask(url, 3, temperature=1.0 if i == 0 or i % 2 else 0.0, seed=7 if i == 0 else 100 + i,
                                     prompt=q if i == 0 else PROMPTS[i]), 6)
    assert mixed[0] == alone
    assert _ask(url, 3, temperature=1.0, seed=8, prompt=q) != alone  # the seed is what it depends on


def test_past_max_batch_requests_wait_past_max_queue_they_get_503(batched):
    url = batched["url"]
    held = [_hold(url) for _ in range(8)]
    try:
        _until(lambda: (_health(url)["running"], _health(url)["waiting"]) == (4, 4), "4 running and 4 waiting")
        code, err = _raw(batched, json.dumps({"model": "ring-tiny", "messages": [{"role": "user", "content": "Hi."}],
                                              "max_tokens": 4}).encode())
        assert code == 503 and "server busy" in err["error"]["message"], (code, err)
        _conforms("ErrorResponse", err)
    finally:
        for h in held:
            h.close()
    _until(lambda: _health(url)["inflight"] == 0 and _health(url)["running"] == 0, "the held requests to leave")
    assert _ask(url, 0)[1] == 8  # still serving


# OpenAI's published schemas (openai/openai-openapi's openapi.json, MIT: see the file's $comment)
SPEC = json.loads((Path(__file__).parent / "data" / "openai_spec_subset.json").read_text())


def _nullable(node):
    """The spec still marks some fields with OpenAPI 3.0's ``nullable: true``, which JSON Schema ignores: read it as
    the spec means it (the type or null)."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _conforms(schema: str, obj) -> None:
    from jsonschema import Draft202012Validator

    Draft202012Validator({**_nullable(SPEC), "$ref": f"#/components/schemas/{schema}"}).validate(obj)


def _post(url: str, body: bytes, headers: dict, path: str = "/v1/chat/completions", chunked: bool = False):
    """(status, body bytes) of a POST; ``chunked``: the body sent with Transfer-Encoding: chunked (no length)."""
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    c.request("POST", path, body=iter([body]) if chunked else body, headers=headers, encode_chunked=chunked)
    r = c.getresponse()
    return r.status, r.read()


def test_replies_validate_against_openais_published_schemas(batched):
    """Every kind of reply (a chat completion with and without the reasoning split, each streamed chunk, the model
    list, each error status) validates against OpenAI's own schema; ``/openapi.json`` declares each status the chat
    route answers (and not FastAPI's 422, which it never answers)."""
    url, hdr = batched["url"], {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    chat = {"model": "ring-tiny", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 6}
    for extra in ({"separate_reasoning": False}, {"separate_reasoning": True}):
        code, body = _post(url, json.dumps({**chat, **extra}).encode(), hdr)
        assert code == 200
        _conforms("CreateChatCompletionResponse", json.loads(body))
    code, body = _post(url, json.dumps({**chat, "stream": True, "stream_options": {"include_usage": True}}).encode(),
                       hdr)
    chunks = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
    assert code == 200 and len(chunks) >= 3 and chunks[-1]["usage"]["completion_tokens"] == 6
    for ch in chunks:
        _conforms("CreateChatCompletionStreamResponse", ch)
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=hdr), timeout=60) as r:
        _conforms("ListModelsResponse", json.loads(r.read()))
    big = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * (9 << 20)}]}).encode()
    answered = set()
    for body, headers, status, chunked in [
            (b"{not json", hdr, 400, False), (json.dumps({**chat, "n": 2}).encode(), hdr, 400, False),
            (json.dumps(chat).encode(), {**hdr, "Authorization": "Bearer wrong"}, 401, False),
            (json.dumps({**chat, "model": "gpt-4"}).encode(), hdr, 404, False),
            (big, hdr, 413, False), (big, hdr, 413, True)]:
        code, reply = _post(url, body, headers, chunked=chunked)
        assert code == status, (body[:60], code, reply[:200])
        _conforms("ErrorResponse", json.loads(reply))
        answered.add(str(code))
    code, body = _post(url, json.dumps(chat).encode(), hdr, chunked=True)  # a chunked body within the limit
    assert code == 200, body
    with urllib.request.urlopen(url + "/openapi.json", timeout=60) as r:
        api = json.loads(r.read())
    declared = api["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert answered | {"200", "500", "503"} <= set(declared) and "422" not in declared, sorted(declared)
    assert set(api["paths"]["/v1/models"]["get"]["responses"]) == {"200", "401"}
    err = api["components"]["schemas"]["ErrorBody"]
    assert set(err["required"]) == {"message", "type", "param", "code"}
