"""Weight transports and the server rollout path on CPU: two real CPU servers (serving/native.py, SGLang's native
API) updated by the broadcast transport over gloo and by the disk transport, sampled through the same client
(rl/sglang_engine.py) that drives SGLang on GPUs, directly and through SGLang's router (the parts that need no server:
test_transport_parts.py)."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megatron_ring.rl import transport as T
from megatron_ring.rl.rollout import InProcessEngine, SamplingParams
from megatron_ring.rl.sglang_engine import SGLangEngine, _free_port

from .conftest import PY, ROOT


def _state(tiny, seed: int, dtype=torch.float32) -> dict:
    from megatron_ring.convert.hf_io import read_hf_state

    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in read_hf_state(tiny["export"]).items()}


def _reference(tiny, state) -> InProcessEngine:
    from megatron_ring.model.hf_config import load_hf_config
    from megatron_ring.tokenizer.tiny import load_tokenizer

    eng = InProcessEngine(load_hf_config(tiny["export"]), load_tokenizer(tiny["export"]))
    eng.update_weights({k: v.float() for k, v in state.items()}, 0)
    return eng


def _send(tr, state: dict, version: int, buckets: int = 3) -> None:
    items = list(state.items())
    tr.begin(version)
    for b in range(buckets):
        tr.bucket(items[b::buckets])
    tr.end()


def _info(url: str) -> dict:
    import urllib.request

    return json.loads(urllib.request.urlopen(url + "/get_model_info", timeout=30).read())


def test_broadcast_transport_updates_both_servers(tiny, servers):
    """Trainer rank 0 (this process) broadcasts each bucket over gloo to the two servers, which join the group
    inside /update_weights_from_distributed; the servers then sample exactly what the in-process engine does with
    the same weights (same seeds), and a second version goes over the same group."""
    from megatron_ring.tokenizer.tiny import load_tokenizer

    eng = SGLangEngine(servers, {}, load_tokenizer(tiny["export"]), "broadcast", master_port=_free_port())
    eng.wait_ready(timeout=60)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=21)
    for version, seed in ((1, 1), (2, 2)):
        state = _state(tiny, seed)
        _send(eng.transport(), state, version)
        assert [_info(u)["weight_version"] for u in servers] == [str(version)] * 2
        got = eng.generate(prompts, 4, sp)
        want = _reference(tiny, state).generate(prompts, 4, sp)
        assert [(r.prompt_index, r.response_ids) for r in got] == [(r.prompt_index, r.response_ids) for r in want]
        assert max(abs(a - b) for r, w in zip(got, want) for a, b in zip(r.logprobs, w.logprobs)) < 1e-4
    # seeds: the K samples of a prompt differ, and the same request reruns identically
    assert len({tuple(r.response_ids) for r in got if r.prompt_index == 0}) > 1
    assert [r.response_ids for r in eng.generate(prompts, 4, sp)] == [r.response_ids for r in got]


def test_a_server_refusal_ends_the_group_wait(servers):
    """A server that cannot join (nccl asked of a CPU server) fails the sync at once with the server's message,
    instead of leaving our rendezvous waiting for it until the timeout."""
    tr = T.BroadcastTransport(servers, [1, 1], "127.0.0.1", _free_port(), backend="nccl", timeout=60)
    t0 = time.time()
    with pytest.raises(T.EngineError, match="gloo groups only"):
        tr.begin(1)
    assert time.time() - t0 < 30


REFUSED_UPDATE = """
import json, os, sys, time, torch
from megatron_ring.rl import transport as T
tr = T.BroadcastTransport(sys.argv[1:3], [1, 1], "127.0.0.1", int(sys.argv[3]), timeout=600)
tr.begin(1)
tr.name = "not_" + tr.name  # an update the servers refuse before joining its broadcasts
t0 = time.time()
try:
    tr.bucket([("model.norm.weight", torch.ones(4))])
    print(json.dumps({"error": None}))
except T.EngineError as e:
    print(json.dumps({"error": str(e), "seconds": time.time() - t0}))
sys.stdout.flush()
os._exit(0)  # (our side of the broadcast is still pending on the group: never joined)
"""


def test_a_refused_update_ends_the_broadcast_wait(servers):
    """A server that refuses an update never joins its broadcasts: the sync fails at once with the server's message
    instead of a broadcast hung until the group's 30-minute timeout."""
    r = subprocess.run([PY, "-c", REFUSED_UPDATE, *servers, str(_free_port())], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["error"] and "not in" in got["error"] and "weight update v1" in got["error"], (got, r.stderr[-2000:])
    assert got["seconds"] < 30


def test_disk_transport_bf16_and_old_versions_removed(tiny, servers, tmp_path):
    tr = T.DiskTransport(servers, tmp_path / "sync", {**json.loads((Path(tiny["export"]) / "config.json").read_text())})
    for v in (1, 2):
        state = _state(tiny, 10 + v, torch.bfloat16)
        _send(tr, state, v)
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["v000002"]  # v1 removed once v2 was loaded
    from megatron_ring.convert.hf_io import read_hf_state

    back = read_hf_state(tmp_path / "sync" / "v000002")
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, state[k]) for k, t in back.items()) and len(back) == len(state)
    eng = SGLangEngine(servers[:1], {}, None, "disk", sync_dir=tmp_path / "sync")
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert [r.response_ids for r in eng.generate([[5, 6, 7]], 1, sp)] == \
        [r.response_ids for r in _reference(tiny, state).generate([[5, 6, 7]], 1, sp)]


def test_ipc_transport_updates_a_colocated_server(tiny, servers):
    """The colocated path's request sequence (release before training, resume, one entry per TP rank, flush)
    against a CPU server on this machine; the tensors travel by shared memory (CUDA IPC handles on a GPU). As on
    SGLang: a release while a request runs fails the scheduler and kills the server, so the release waits until the
    server is idle; every tag it released (``{}``: KV cache, weights, CUDA graphs) is resumed before the server
    generates again (the look-alike refuses to generate from released memory)."""
    import threading

    eng = SGLangEngine(servers[:1], {}, None, "ipc")
    tr = eng.transport()
    busy = threading.Thread(target=eng.generate, args=([[5, 6, 7]], 16, SamplingParams(max_new_tokens=250)))
    busy.start()  # (seconds of decoding: a request still finishing when training starts)
    time.sleep(0.3)
    eng.before_training()
    busy.join(60)
    assert tr.released and not busy.is_alive() and eng.health()  # the server lived through the release
    with pytest.raises(T.EngineError, match=r"memory released \(\['cuda_graph', 'kv_cache', 'weights'\]\)"):
        eng.generate([[5, 6, 7]], 1, SamplingParams(max_new_tokens=4))
    state = _state(tiny, 31)
    _send(tr, state, 4)
    assert not tr.released and _info(servers[0])["weight_version"] == "4"
    sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert [r.response_ids for r in eng.generate([[5, 6, 7]], 1, sp)] == \
        [r.response_ids for r in _reference(tiny, state).generate([[5, 6, 7]], 1, sp)]


def test_server_errors_carry_the_servers_message(servers):
    """A prompt + max_new_tokens beyond the server's context (256): SGLang's 400 message, which prompt it was."""
    eng = SGLangEngine(servers, {}, None, "broadcast")
    with pytest.raises(T.EngineError, match=r"prompt 1 \(250 tokens.*maximum context length of 256"):
        eng.generate([[5, 6], [7] * 250], 1, SamplingParams(max_new_tokens=16))


@pytest.fixture(scope="module")
def router(servers, tmp_path_factory):
    """SGLang's router (the pinned sglang-router: its Rust gateway, started as the job scripts start it) in front
    of the two CPU servers."""
    import os
    import signal

    from serving.router import SGLangRouter, launch

    r = SGLangRouter(servers, port=_free_port(), prometheus_port=_free_port())
    proc = launch(r, str(tmp_path_factory.mktemp("router") / "log"), timeout=120)
    yield r.url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def _served(url: str) -> int:
    import urllib.request

    return json.loads(urllib.request.urlopen(url + "/get_server_info", timeout=30).read())["generate_requests"]


def test_rollouts_through_sglang_router_equal_the_direct_ones(tiny, servers, router):
    """Through SGLang's real router (one request per sample, each with its own seed) the client gets the samples
    it gets from the servers directly (one request per prompt), the router spreads them over both servers, and a
    server's refusal reaches the client with the server's message, naming the prompt and the sample."""
    from megatron_ring.tokenizer.tiny import load_tokenizer

    tok = load_tokenizer(tiny["export"])
    SGLangEngine(servers, {}, tok, "disk").load_from_disk(tiny["export"])  # (both alike: the IPC test updates one)
    prompts = [[5 + i, 6, 7 + 2 * i, 8] for i in range(6)]
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5)
    direct = SGLangEngine(servers, {}, tok).generate(prompts, 3, sp)
    eng = SGLangEngine(servers, {}, tok, router=router)
    eng.wait_ready(timeout=60)
    before = [_served(u) for u in servers]
    got = eng.generate(prompts, 3, sp)
    per_server = [_served(u) - b for u, b in zip(servers, before)]
    assert [(r.prompt_index, r.response_ids) for r in got] == [(r.prompt_index, r.response_ids) for r in direct]
    assert max(abs(a - b) for r, w in zip(got, direct) for a, b in zip(r.logprobs, w.logprobs)) < 1e-5
    assert len({tuple(r.response_ids) for r in got if r.prompt_index == 0}) > 1  # the K samples differ
    assert sum(per_server) == 18 and min(per_server) > 0, per_server
    with pytest.raises(T.EngineError, match=r"prompt 1 sample \d \(250 tokens.*maximum context length of 256"):
        eng.generate([[5, 6], [7] * 250], 2, SamplingParams(max_new_tokens=16))


from .test_rl_trainer import KEYS, _rl, uninterrupted  # noqa: E402


def test_rl_with_two_cpu_servers_equals_the_in_process_engine_by_every_transport_and_resumes_exactly(
        tiny, data, tmp_path, tmp_path_factory, servers, router):
    """`megatron-ring rl` with engine sglang against the two CPU servers (trainer at EP2 on 2 ranks: rank 1's
    experts travel too), by each weight transport — broadcast over gloo, each rank on its own group; disk, each
    trainer rank writing the shards it assembles; ipc, the colocated layout (2 ranks = 2 servers × TP1: each rank
    serializes its own copy and posts it to the server on "its GPU") — every per-step figure equals the in-process
    engine's for the same seeds (broadcast and disk with nothing gathered between the trainer ranks: each sends
    what it holds); only the rollout log-probs differ in their last bits (the servers batch one prompt's samples,
    the in-process engine 16 rows at once), bounded here; the same through SGLang's router (broadcast; one request
    per sample; with one weight sender per pipeline stage, the ling_lite recipes' setting). A run stopped after
    step 2 and resumed matches exactly."""
    srv = ["--ep", "2", "--engine", "sglang", "--sglang-urls", *servers]
    a = uninterrupted(tmp_path_factory, tiny, data, 2)[0]  # the in-process engine (shared with test_rl_trainer)
    runs = {way: _rl(2, data, tiny["mcore"], tmp_path / way, 4, *srv, "--weight-transport", way,
                     "--weight-bucket-mb", "1")  # (the tiny model, 5 MB, in several buckets: both ranks assemble)
            for way in ("broadcast", "disk", "ipc")}
    before = sum(_served(u) for u in servers)
    runs["router"] = _rl(2, data, tiny["mcore"], tmp_path / "router", 4, *srv, "--sglang-router", router,
                         "--weight-senders", "stages")  # (one sender per pipeline stage: rank 1's experts via rank 0)
    assert sum(_served(u) for u in servers) - before >= 4 * 4 * 4  # one request per sample (4 steps x 4 x K=4)
    for way, s in runs.items():
        assert [r["step"] for r in s] == [0, 1, 2, 3, 4], way
        for ra, rs in zip(a, s):
            assert {k: ra.get(k) for k in KEYS} == {k: rs.get(k) for k in KEYS}, (way, ra, rs)
            assert ra.get("eval/math") == rs.get("eval/math"), way
            if rs["step"]:
                assert rs["logp_mismatch"] < 1e-5 and rs["time/sync"] > 0, way
                if way in ("broadcast", "disk"):  # every rank sends the weights it holds: nothing crosses ranks
                    assert rs["sync/gathered_mb"] == 0 < ra["sync/gathered_mb"], (way, rs, ra)
                elif way == "router":  # stages: rank 1's experts go to rank 0, the stage's one sender
                    assert rs["sync/gathered_mb"] == ra["sync/gathered_mb"] > 0, (way, rs, ra)
    assert not (tmp_path / "broadcast" / "weight_sync").exists()  # no file on the way (the disk transport's folder)
    assert not (tmp_path / "ipc" / "weight_sync").exists()
    left = sorted(p.name for p in (tmp_path / "disk" / "weight_sync").iterdir())
    assert left == ["v000004"], left  # the last version only; its shards written by both trainer ranks
    assert {f.name.split("-")[1] for f in (tmp_path / "disk" / "weight_sync" / left[0]).glob("*.safetensors")} \
        == {"r000", "r001"}
    _rl(2, data, tiny["mcore"], tmp_path / "resumed", 2, *srv)
    b = _rl(2, data, tiny["mcore"], tmp_path / "resumed", 4, *srv)
    for rs, rb in zip(runs["broadcast"], b):
        assert {k: rs.get(k) for k in KEYS} == {k: rb.get(k) for k in KEYS}, (rs, rb)


def test_selection_entropy_through_the_servers_matches_the_in_process_one(tiny, servers, tmp_path):
    """`select --sglang-urls`: the entropy from the servers' sampled log-probs (−mean log p, what SGLang returns)
    estimates the in-process figure (full next-token distributions along the model's own samples). The random
    tiny model is sharpened first (final norm x 6: ~2 nats instead of ~ln 512), so a wrong temperature shows."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_ring.select.entropy import served_entropy, token_entropy

    sharp = tmp_path / "sharp"
    shutil.copytree(tiny["export"], sharp)
    w = load_file(sharp / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] * 6
    save_file(w, sharp / "model.safetensors", metadata={"format": "pt"})
    prompts = [f"What is {i} plus {2 * i}?" for i in range(48)]
    exact = token_entropy(sharp, prompts, 32, seed=0)
    served = served_entropy(servers, sharp, prompts, 32, seed=0)
    assert 0.5 < exact < 4.0, exact
    assert served == pytest.approx(exact, rel=0.05), (served, exact)
    # the selection's accuracy column through the same servers (now holding `sharp`): greedy answers graded alike
    from megatron_ring.sft.heldout import answer_accuracy, served_accuracy

    import pyarrow as pa
    import pyarrow.parquet as pq

    ev = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(24)], "prompt": [f"Compute {i} + {i}." for i in range(24)],
                             "answer": [str(2 * i) for i in range(24)]}), ev)
    here = answer_accuracy(sharp, ev, limit=24, max_new_tokens=24)
    there = served_accuracy(servers, sharp, ev, limit=24, max_new_tokens=24)
    assert there["n"] == here["n"] == 24 and there["accuracy"] == here["accuracy"]
    assert there["preds"] == here["preds"], (there["preds"], here["preds"])
    same = sum(a == b for a, b in zip(there["texts"], here["texts"]))
    print(f"served greedy answers equal to the in-process ones: {same}/24")
    assert same >= 22, list(zip(there["texts"], here["texts"]))


def test_difficulty_rollouts_through_the_servers_equal_the_in_process_ones(tiny, data, servers, tmp_path):  # noqa: F811
    """`megatron-ring rollouts --sglang-urls` (the difficulty filter's rollouts on the job's servers): the checkpoint
    exported next to the output and loaded by the servers, the same per-sample seeds — the same samples, rewards and
    lengths as the in-process run."""
    import pyarrow.parquet as pq

    def run(out, *extra):
        r = subprocess.run([PY, "-m", "megatron_ring.cli", "rollouts", "--ckpt", str(tiny["mcore"]), "--prompts",
                            str(data / "rl_stage1" / "4_filtered.parquet"), "--tokenizer", str(data / "tokenizer"),
                            "--out", str(out), "--k", "3", "--limit", "6", "--max-new-tokens", "24", "--chunk", "4",
                            *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return pq.read_table(str(out)).to_pylist()

    local = run(tmp_path / "local.parquet")
    cfg = json.loads((Path(tiny["export"]) / "config.json").read_text())
    _send(T.DiskTransport(servers, tmp_path / "other", cfg), _state(tiny, 5), 9)  # the servers hold other weights
    served = run(tmp_path / "served.parquet", "--sglang-urls", *servers)
    assert len(local) == 18 and (tmp_path / "served.parquet.hf" / "config.json").exists()
    assert served == local
    assert len({r["response"] for r in local if r["id"] == local[0]["id"]}) > 1  # the K samples differ
