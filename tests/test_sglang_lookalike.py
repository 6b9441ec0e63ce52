"""The CPU look-alike of SGLang (serving/native.py) against the pinned SGLang 0.5.23's semantics, through the
rollout client: requests aborted (a 200 with finish_reason abort, never scored), seeds honoured only under
deterministic inference, the weight-update session's refusals and /flush_cache's plain-text replies (the source
side of the same protocol: test_transport_parts.py's conformance test). The servers are conftest's ``servers``."""
import time

import pytest
import torch

from megatron_ring.rl import transport as T
from megatron_ring.rl.rollout import SamplingParams
from megatron_ring.rl.sglang_engine import SGLangEngine, _free_port

from .conftest import native_server
from .test_transport import _info, _send, _state


def test_a_stop_request_ends_a_server_generation_and_aborts_it_there(tiny, servers):
    """``should_stop`` turning true (preemption) ends a long server generation within a poll, aborts what the servers
    run (SGLang's /abort_request), and leaves them serving: the next request is answered."""
    from megatron_ring.rl.rollout import Interrupted
    from megatron_ring.tokenizer.tiny import load_tokenizer

    eng = SGLangEngine(servers, {}, load_tokenizer(tiny["export"]), "broadcast")
    eng.wait_ready(timeout=60)
    sp = SamplingParams(max_new_tokens=200, temperature=1.0, seed=3)
    t0 = time.time()
    full = eng.generate([[5, 6, 7]] * 16, 4, sp)  # the same request, uninterrupted
    whole = time.time() - t0
    t0 = time.time()
    with pytest.raises(Interrupted, match="unanswered"):
        eng.generate([[5, 6, 7]] * 16, 4, sp, should_stop=lambda: time.time() - t0 > 0.3)
    stopped = time.time() - t0
    import threading

    from megatron_ring.rl.sglang_engine import generate_payload, parse_generate
    from serving.sglang_protocol import ABORTED

    raw = []  # SGLang answers a request ended by abort_all with a 200: finish_reason abort and what it had
    t = threading.Thread(target=lambda: raw.append(T.post(servers[0] + "/generate", generate_payload(
        [[5, 6, 7]], 4, sp), 60)))
    t.start()
    time.sleep(0.3)
    eng.abort()
    t.join(60)
    assert [o["meta_info"]["finish_reason"] for o in raw[0]] == [ABORTED] * 4
    assert 0 < len(raw[0][0]["output_ids"]) < 200  # cut off
    with pytest.raises(T.EngineError, match="aborted by the server"):  # never scored as a finished answer
        parse_generate(raw[0], [[5, 6, 7]], 4)
    t0 = time.time()
    again = eng.generate([[5, 6, 7]], 2, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    print(f"whole {whole:.2f} s, stopped after {stopped:.2f} s, next request {time.time() - t0:.2f} s")
    assert whole > 1.0 and stopped < min(whole / 2, 5.0), (stopped, whole)
    assert len(again) == 2 and len(full) == 64 and time.time() - t0 < whole / 2  # (not queued behind the rest)


@pytest.fixture(scope="module")
def plain_server(tiny):
    """A CPU server without --enable-deterministic-inference (in this process: its app on a uvicorn thread)."""
    import socket
    import threading

    import uvicorn

    from serving.native import Server, create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    srv = uvicorn.Server(uvicorn.Config(create_app(Server(str(tiny["export"]), 256)), log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    from serving.health import wait_healthy

    wait_healthy(url, timeout=60, interval=0.1)
    yield url
    srv.should_exit = True
    th.join(30)


def test_seeds_count_only_on_servers_under_deterministic_inference(tiny, servers, plain_server):
    """As SGLang 0.5.23: a sample's ``sampling_seed`` is honoured only by a server started with
    --enable-deterministic-inference (the fixture's two): the same seeds give the same samples there, and a server
    without the flag samples anew (the same seeded request twice differs). The engine reads the flag from
    ``/server_info``: it sends no seed where none counts, and where the recipe asks for reproducible rollouts it
    refuses such a server before the first request, naming it and the flag."""
    from megatron_ring.rl.sglang_engine import generate_payload

    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)
    det = SGLangEngine(servers[:1], {}, None, "disk", deterministic=True)
    det.wait_ready(timeout=60)
    a, b = (det.generate([[5, 6, 7]], 4, sp) for _ in range(2))
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    body = generate_payload([[5, 6, 7]], 4, sp)
    x, y = (T.post(plain_server + "/generate", body, 60) for _ in range(2))
    assert [o["output_ids"] for o in x] != [o["output_ids"] for o in y]  # the seeds ignored, as SGLang does
    free = SGLangEngine([plain_server], {}, None, "disk")
    assert free.seeded() is False and det.seeded() is True
    assert all("sampling_seed" not in p for p in generate_payload([[5, 6, 7]], 4, sp, seeded=False)["sampling_params"])
    c, d = (free.generate([[5, 6, 7]], 4, sp) for _ in range(2))
    assert [r.response_ids for r in c] != [r.response_ids for r in d]
    with pytest.raises(T.EngineError, match=f"{plain_server}: running without --enable-deterministic-inference"):
        SGLangEngine([plain_server, servers[0]], {}, None, "disk", deterministic=True).wait_ready(timeout=60)


def test_the_servers_keep_sglangs_session_and_flush_rules_and_the_client_reads_them(tiny, servers):
    """As SGLang 0.5.23: an update outside a weight-update session is a 400 with SGLang's message (no broadcast
    joined); a second open or a close without one is refused; /flush_cache answers plain text, a 400 while a
    generation runs unless ``?timeout=`` lets it finish. The client takes the text for what it is (no JSON error),
    a refused flush is an EngineError carrying the text, and the transports open and close the sessions (a session
    left open by a trainer that died is closed and opened again)."""
    import threading

    from megatron_ring.rl import http
    from serving import sglang_protocol as P

    u = servers[1]
    http.abandon_sessions([u], 30, None)  # (test_a_refused_update… leaves its session open, as a dead trainer would)
    body = T.distributed_payload([("model.norm.weight", torch.ones(4))], 9, "no_group")
    with pytest.raises(T.EngineError, match="must run between begin_weight_update"):
        T.post(u + "/update_weights_from_distributed", body, 30)
    assert T.post(u + "/begin_weight_update", {}, 30) == {"success": True, "message": "Success"}
    with pytest.raises(T.EngineError, match="already open"):
        T.post(u + "/begin_weight_update", {}, 30)
    http.open_sessions([u], 30, None)  # (left open by a trainer that died: closed and opened again)
    T.post(u + "/end_weight_update", {}, 30)
    with pytest.raises(T.EngineError, match="no weight-update session is open"):
        T.post(u + "/end_weight_update", {}, 30)
    assert T.post(u + "/flush_cache", {}, 30) == {"text": P.FLUSHED}
    eng = SGLangEngine([u], {}, None, "broadcast", master_port=_free_port())
    out = []
    sp = SamplingParams(max_new_tokens=250)
    busy = threading.Thread(target=lambda: out.append(eng.generate([[5, 6, 7]], 16, sp)))
    busy.start()  # (16 samples x 250 tokens: seconds of decoding)
    try:
        time.sleep(0.2)
        with pytest.raises(T.EngineError, match="HTTP 400: Flush cache failed"):
            T.post(u + "/flush_cache", {}, 30)
        http.flush_all([u], 60.0, 90, None)  # waits for the generation to end, then flushes (a 400 would raise)
    finally:
        busy.join(60)
    # the generation the flush waited for finished whole (no abort); the client may still have been reading its
    # reply (it polls every 0.2 s) when the flush answered: hence the join, not an is_alive() check at that instant
    assert not busy.is_alive() and len(out) == 1 and len(out[0]) == 16
    state = _state(tiny, 41)
    _send(eng.transport(), state, 7)  # begin (session) -> buckets -> end (session closed, cache flushed)
    assert _info(u)["weight_version"] == "7"
    with pytest.raises(T.EngineError, match="no weight-update session is open"):
        T.post(u + "/end_weight_update", {}, 30)  # the transport closed its session


def test_the_look_alike_dies_where_sglangs_scheduler_does(tiny, tmp_path):
    """SGLang's scheduler asserts that it is idle on a memory release and removes each resumed tag from its released
    set; a failed assertion (or KeyError) in the scheduler kills the whole server. The look-alike does the same, so
    a client that releases while a request runs, or resumes what it never released, fails on the CPU too."""
    import threading

    from megatron_ring.rl.sglang_engine import generate_payload

    for name, misuse, said in (("busy", "/release_memory_occupation", "only when server is idle"),
                               ("resume", "/resume_memory_occupation", "KeyError: 'kv_cache'")):
        url, proc = native_server(tiny["export"], tmp_path / name)
        try:
            if name == "busy":  # a long generation running
                threading.Thread(target=lambda: _quiet(T.post, url + "/generate", generate_payload(
                    [[5, 6, 7]], 16, SamplingParams(max_new_tokens=250)), 60), daemon=True).start()
                time.sleep(0.3)
            with pytest.raises(T.EngineError):  # (no answer: the server is gone)
                T.post(url + misuse, {"tags": ["kv_cache"]} if name == "resume" else {}, 30)
            assert proc.wait(timeout=30) != 0
            assert said in (tmp_path / name / "log").read_text()
        finally:
            proc.kill()


def _quiet(fn, *args):
    try:
        fn(*args)
    except T.EngineError:
        pass
