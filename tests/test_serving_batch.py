"""The CPU server batches (``megatron_ring/hf/decoding.py``, continuous batching): requests decoded together give
the replies they get one at a time, token for token when greedy; a sampled reply depends on its seed, not on its
neighbours in the batch; past ``--max-batch`` requests wait, past ``--max-queue`` they get a 503 and the server keeps
serving. The tiny random export is enough: the replies are compared with each other, not with taught text."""
import json
import threading
from concurrent.futures import ThreadPoolExecutor

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
    finally:
        for h in held:
            h.close()
    _until(lambda: _health(url)["inflight"] == 0 and _health(url)["running"] == 0, "the held requests to leave")
    assert _ask(url, 0)[1] == 8  # still serving
