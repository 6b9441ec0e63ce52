"""The rollout client's parts that need no server: request bodies against the pinned SGLang's own request classes,
each trainer rank's weight-update rendezvous, the IPC serializer, the in-process transport's refusals, and the
context refused before any server starts."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_ring.rl import transport as T
from megatron_ring.rl.rollout import SamplingParams
from megatron_ring.rl.sglang_engine import abort_payload, generate_payload

from .conftest import PY, ROOT
from .test_transport import _reference

API = json.loads((Path(__file__).parent / "data" / "sglang_api.json").read_text())["classes"]


def _fits(payload: dict, cls: str) -> None:
    fields = {**API[cls], **API["BaseReq"]}
    assert set(payload) <= set(fields), f"{cls}: SGLang has no field(s) {sorted(set(payload) - set(fields))}"
    required = {f for f, has_default in API[cls].items() if not has_default}
    assert required <= set(payload), f"{cls}: required field(s) missing {sorted(required - set(payload))}"


def test_request_bodies_use_sglang_fields():
    """Every body we send, and every field the CPU server accepts, exists in the pinned SGLang's request class."""
    from serving import sglang_protocol as native

    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    g = generate_payload([[1, 2]], 2, SamplingParams(max_new_tokens=4, seed=1))
    _fits(g, "GenerateReqInput")
    for sp in g["sampling_params"]:
        assert set(sp) <= set(API["SamplingParams"]), sorted(set(sp) - set(API["SamplingParams"]))
    _fits(T.init_group_payload("h", 1, 1, 3, "nccl"), "InitWeightsUpdateGroupReqInput")
    d = T.distributed_payload([("a", t)], 3)
    _fits(d, "UpdateWeightsFromDistributedReqInput")
    assert d["dtypes"] == ["bfloat16"] and d["shapes"] == [[2, 3]] and d["weight_version"] == "3"
    _fits(T.tensor_payload(["x", "y"], 3), "UpdateWeightsFromTensorReqInput")
    _fits(T.disk_payload("/p", 3), "UpdateWeightFromDiskReqInput")
    _fits({"tags": ["weights"]}, "ResumeMemoryOccupationReqInput")
    _fits(abort_payload(), "AbortReq")
    models = {native.GenerateReq: "GenerateReqInput", native.Sampling: "SamplingParams",
              native.InitGroupReq: "InitWeightsUpdateGroupReqInput", native.DiskReq: "UpdateWeightFromDiskReqInput",
              native.DistributedReq: "UpdateWeightsFromDistributedReqInput",
              native.MemoryReq: "ReleaseMemoryOccupationReqInput", native.TensorReq: "UpdateWeightsFromTensorReqInput",
              native.AbortReq: "AbortReq"}
    models.update({native.BeginReq: "BeginWeightUpdateReqInput", native.EndReq: "EndWeightUpdateReqInput"})
    for model, cls in models.items():
        extra = set(model.model_fields) - set(API[cls]) - set(API["BaseReq"]) - native.ROUTER_ONLY
        assert not extra, f"serving/native.py {model.__name__} accepts fields SGLang's {cls} lacks: {extra}"


def test_each_trainer_rank_meets_the_servers_on_its_own_host_and_port(monkeypatch):
    """The job scripts' MEGATRON_RING_SYNC_PORT: every rank, rank 0 included, at its own host, port + its rank (one
    group per sender; c10d puts rank 0 on the node whose name sorts first, which need not be the allocation's first
    host, so no host is named for it); without it, a free port at the address the servers reach: 127.0.0.1 for
    servers on this host, else the address of the interface that routes to them (a server told 127.0.0.1 would wait
    for itself for SGLang's 30-minute group timeout), or a refusal saying so."""
    import socket

    import ipaddress

    from megatron_ring.rl.http import EngineError
    from megatron_ring.rl.sglang_engine import reachable_address, sync_rendezvous

    monkeypatch.delenv("MEGATRON_RING_SYNC_PORT", raising=False)
    assert sync_rendezvous(0) == sync_rendezvous(3) == (None, None)
    assert reachable_address(["http://127.0.0.1:30000", "http://localhost:30001"]) == "127.0.0.1"
    try:  # (TEST-NET-1: routed by the default route where there is one)
        got = reachable_address(["http://127.0.0.1:30000", "http://192.0.2.77:30000"])
        assert not ipaddress.ip_address(got).is_loopback, got
    except EngineError as e:
        assert "no route to the server host '192.0.2.77'" in str(e) and "MEGATRON_RING_SYNC_PORT" in str(e)
    assert T.BroadcastTransport(["http://127.0.0.1:1"], [1], None, 1).addr == "127.0.0.1"
    try:  # the transport a trainer builds without the job script's environment, for servers on another host
        assert not ipaddress.ip_address(T.BroadcastTransport(["http://192.0.2.77:1"], [1], None, 1).addr).is_loopback
    except EngineError as e:
        assert "MEGATRON_RING_SYNC_PORT" in str(e)
    monkeypatch.setenv("MEGATRON_RING_SYNC_PORT", "50042")
    monkeypatch.setenv("MEGATRON_RING_SYNC_ADDR", "gpu1")  # (what the job scripts set before: the first host)
    assert sync_rendezvous(0) == (socket.gethostname(), 50042) and sync_rendezvous(3) == (socket.gethostname(), 50045)


def test_ipc_serializer_one_entry_per_tp_rank(monkeypatch):
    """Colocated servers: one serialized entry per server TP rank (SGLang indexes the list by its TP rank), each
    SGLang's MultiprocessingSerializer format (base64 of a ForkingPickler dump)."""
    import base64
    import pickle

    blob = T.serialize_for_ipc([("w", torch.arange(6.0).reshape(2, 3))])
    body = T.tensor_payload([blob] * 4, 5)
    assert len(body["serialized_named_tensors"]) == 4
    # one process serving a TP-4 server: a serialization of its own per TP rank (SGLang: each rank must open only
    # its own copy, or the producer's CUDA-IPC reference counts break)
    sent, made = [], []
    monkeypatch.setattr(T, "serialize_for_ipc", lambda named: made.append(named) or f"blob{len(made)}")
    tr = T.IPCTransport(["http://s"], 4)
    tr._all, tr.version = (lambda path, b: sent.append(b)), 1
    tr.bucket([("w", torch.ones(2))])
    assert sent[0]["serialized_named_tensors"] == ["blob1", "blob2", "blob3", "blob4"]
    (name, t), = pickle.loads(base64.b64decode(blob))  # (CPU tensors: shared memory; CUDA ones: IPC handles)
    assert name == "w" and torch.equal(t, torch.arange(6.0).reshape(2, 3))


def test_inprocess_transport_refuses_a_partial_or_unknown_update(tiny):
    from megatron_ring.convert.hf_io import read_hf_state

    state = read_hf_state(tiny["export"])
    eng = _reference(tiny, state)
    tr = eng.transport()
    tr.begin(1)
    tr.bucket(list(state.items())[:-1])
    with pytest.raises(RuntimeError, match="not sent"):
        tr.end()
    tr.begin(2)
    with pytest.raises(RuntimeError, match="no such parameter"):
        tr.bucket([("model.layers.0.mlp.experts.99.up_proj.weight", torch.zeros(1))])


def test_context_beyond_the_positions_is_refused_before_any_server_starts(tiny, data):  # noqa: F811
    """`rl --print-launch` (what the job script asks before it starts the servers): prompt + max_new_tokens
    past the model's max_position_embeddings (2048 in the tiny config) is refused naming both, unless the recipe
    allows it; the ling_lite recipes do (the paper's 24K/32K RL on a 16,384-position config)."""
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.rl.config import ContextTooLong, rl_config, rollout_context

    def ctx(*extra):
        return subprocess.run([PY, "-m", "megatron_ring.cli", "rl", "--recipe", "rl_stage1_tiny", "--init",
                               str(tiny["mcore"]), "--print-launch", *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    ok = ctx()
    got = dict(ln.split("=", 1) for ln in ok.stdout.splitlines())
    assert ok.returncode == 0 and got["RL_CONTEXT"] == str(1024 + 192) and got["RL_BEYOND_POSITIONS"] == "0", ok
    assert got["RL_START"] == str(tiny["mcore"])
    bad = ctx("--max-new-tokens", "1500")
    assert bad.returncode == 2 and "2524 tokens exceed the model's max_position_embeddings 2048" in bad.stderr
    published = json.loads((Path(__file__).parent / "data" / "published_configs" / "ring-lite.chat.config.json").read_text())
    for stage, need in (("rl_stage1_ling_lite", 2048 + 24576), ("rl_stage2_ling_lite", 2048 + 32768)):
        cfg = rl_config(load_recipe(stage))
        assert rollout_context(cfg, published) == need > published["max_position_embeddings"]
        cfg.context_beyond_positions = False
        with pytest.raises(ContextTooLong, match="context_beyond_positions"):
            rollout_context(cfg, published)


def _sglang_source(rel: str) -> str:
    import sys

    side = Path(sys.executable).parents[1] / "sglang-side" / "sglang" / "srt"
    assert side.is_dir(), f"{side}: SGLang's side folder is missing (bash scripts/setup_env.sh makes it)"
    return (side / rel).read_text()


def test_the_cpu_look_alike_speaks_the_pinned_sglangs_protocol():
    """Read from SGLang 0.5.23's own source (the pinned wheel in the side folder): every route the look-alike serves
    exists there with the same methods; the weight-update session's rules (its routes, request classes and refusals)
    and /flush_cache's plain-text replies are the ones ``serving/sglang_protocol.py`` answers with. A later SGLang
    that changes any of them fails here."""
    import ast

    from serving import sglang_protocol as P
    from serving.native import create_app

    http = ast.parse(_sglang_source("entrypoints/http_server.py"))
    routes: dict[str, set[str]] = {}
    for fn in ast.walk(http):
        for d in getattr(fn, "decorator_list", []):
            if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.args and \
                    isinstance(d.args[0], ast.Constant) and str(d.args[0].value).startswith("/"):
                kind = d.func.attr
                methods = ({"GET", "POST"} if kind == "api_route" else {kind.upper()})
                for kw in d.keywords:
                    if kw.arg == "methods":
                        methods = {e.value for e in kw.value.elts}
                routes.setdefault(d.args[0].value, set()).update(methods)
    from fastapi.routing import APIRoute

    ours: dict[str, set[str]] = {}
    app = create_app(_NoServer())
    for r in app.routes:
        if isinstance(r, APIRoute):
            ours.setdefault(r.path, set()).update(r.methods)
    for path, methods in ours.items():
        assert path in routes and methods <= routes[path], (path, methods, routes.get(path))
    assert {"/begin_weight_update", "/end_weight_update", "/flush_cache"} <= set(ours)

    def strings(tree) -> set[str]:  # (adjacent literals are one constant in the AST)
        return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    flush = next(f for f in ast.walk(http) if isinstance(f, ast.AsyncFunctionDef) and f.name == "flush_cache")
    assert {P.FLUSHED, P.FLUSH_FAILED} <= strings(flush)
    assert "Response" in ast.unparse(flush) and "ORJSONResponse" not in ast.unparse(flush)  # plain text, not JSON
    updater = ast.parse(_sglang_source("managers/scheduler_components/weight_updater.py"))
    said = strings(updater)
    assert {P.SESSION_OPEN, P.NO_SESSION_OPEN, P.outside_session("update_weights_from_distributed"),
            P.outside_session("update_weights_from_tensor")} <= said
    disk = next(f for f in ast.walk(updater) if isinstance(f, ast.FunctionDef) and f.name == "update_weights_from_disk")
    assert "_session" not in ast.unparse(disk)  # (the disk path needs no session: the look-alike does not ask one)
    assert P.FLUSH_TIMED_OUT in strings(ast.parse(_sglang_source("managers/scheduler_components/flush_wrapper.py")))
    io = ast.parse(_sglang_source("managers/io_struct.py"))
    for cls, model in (("BeginWeightUpdateReqInput", P.BeginReq), ("EndWeightUpdateReqInput", P.EndReq)):
        node = next(c for c in ast.walk(io) if isinstance(c, ast.ClassDef) and c.name == cls)
        fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
        assert fields == set(model.model_fields), (cls, fields)
    # memory: the scheduler's idle assertion on a release, the tags an empty list means, and a resume that
    # removes each tag (a KeyError for one not released)
    assert P.NOT_IDLE_RELEASE in said and "offload_tags.remove" in ast.unparse(updater)
    consts = ast.parse(_sglang_source("constants.py"))
    named = {t.id: n.value.value for n in ast.walk(consts) if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(n.value, ast.Constant)}
    every = next(n for n in ast.walk(consts) if isinstance(n, ast.Assign) and n.targets[0].id == "GPU_MEMORY_ALL_TYPES")
    assert tuple(named[e.id] for e in every.value.elts) == P.MEMORY_TAGS
    # an abort_all'd request: a 200 whose finish_reason is FINISH_ABORT().to_json() (no status code)
    batch = ast.parse(_sglang_source("managers/schedule_batch.py"))
    fa = next(c for c in ast.walk(batch) if isinstance(c, ast.ClassDef) and c.name == "FINISH_ABORT")
    init, to_json = (next(f for f in fa.body if isinstance(f, ast.FunctionDef) and f.name == n)
                     for n in ("__init__", "to_json"))
    assert {k.value for k in next(n for n in ast.walk(to_json) if isinstance(n, ast.Dict)).keys} == set(P.ABORTED)
    assert f'message or "{P.ABORTED["message"]}"' in ast.unparse(init).replace("'", '"')
    assert [a.value for a in init.args.defaults] == [None, None, None]  # (message, status_code, err_type)
    # seeds: honoured only under --enable-deterministic-inference (a ServerArgs field, in /server_info)
    sampling = _sglang_source("sampling/sampling_batch_info.py")
    assert "enable_deterministic_inference" in sampling and "sampling_seed" in sampling
    fields = strings(ast.parse(_sglang_source("arg_groups/field_order.py")))
    assert {"enable_deterministic_inference", "enable_memory_saver", "tp_size"} <= fields
    assert any(isinstance(f, ast.AsyncFunctionDef) and f.name == "server_info" for f in ast.walk(http))


class _NoServer:
    """Enough of ``serving.native.Server`` to build its app (the routes only)."""

    def __getattr__(self, name):
        return lambda *a: None


def test_stage_senders_cap_the_weight_update_groups_at_one_per_pipeline_stage():
    """Every rank that assembles a bucket makes its own NCCL group with every server GPU (sized after SGLang sized
    its KV cache). On a ling_lite-like layout (16 ranks: TP4 x EP8 per stage, here 2 stages) the owners each send
    (8 senders per stage), the ``stages`` setting (the ling_lite recipes') one per stage, taking every unit of its
    stage."""
    from megatron_ring.rl.weights import Unit, spread_buckets

    world, per = 16, 8  # ranks 0-7: stage 0, ranks 8-15: stage 1
    units = []
    for stage in range(2):
        for layer in range(2):
            units.append(Unit(f"s{stage}.l{layer}.qkv", (8, 4), "bfloat16",
                              [(stage * per + r, (2 * r, 0), (2, 4)) for r in range(4)]))  # TP4
            units += [Unit(f"s{stage}.l{layer}.e{e}", (4, 4), "bfloat16", [(stage * per + e % per, (0, 0), (4, 4))])
                      for e in range(64)]  # whole experts over EP8
    owners = {r for _, r in spread_buckets(units, 1 << 10, world)}
    stage_first = [0] * per + [per] * per
    staged = spread_buckets(units, 1 << 10, world, stage_first)
    assert len(owners) == 16 and {r for _, r in staged} == {0, 8}
    for bucket, r in staged:
        assert all(p[0] // per == r // per for u in bucket for p in u.pieces)  # its own stage's weights only
    assert sorted(u.name for b, _ in staged for u in b) == sorted(u.name for u in units)


def test_the_rollout_client_waits_as_long_as_the_router_and_the_rollout():
    """A 32K-token stage-2 request can take hours on a loaded server: the client's timeout is at least the router's
    request timeout and the other ranks' rollout wait (an hour-long fixed timeout failed the step first)."""
    from megatron_ring.config.recipe import load_recipe
    from megatron_ring.rl.config import client_timeout, rl_config
    from serving.router import REQUEST_TIMEOUT_S, SGLangRouter

    for name in ("rl_stage1_ling_lite", "rl_stage2_ling_lite", "rl_stage1_tiny"):
        cfg = rl_config(load_recipe(name))
        assert client_timeout(cfg) >= max(SGLangRouter(["u"]).request_timeout_s, cfg.rollout_timeout_minutes * 60)
    cfg = rl_config(load_recipe("rl_stage2_ling_lite"), rollout_timeout_minutes=600)
    assert client_timeout(cfg) == 36000 > REQUEST_TIMEOUT_S
    assert client_timeout(rl_config(load_recipe("rl_stage2_ling_lite"), request_timeout_s=99.0)) == 99.0


def test_a_rollout_server_that_ended_fails_the_wait_at_once_with_its_log(tmp_path, monkeypatch):
    """The RL job script keeps each rollout server's output (SGLang's log) in RL_OUT/logs/sglang-<host>.log and
    writes its exit status beside it when it ends; the trainer's wait for the servers then fails at once with the
    end of that log, instead of waiting 30 minutes for a /health that never answers."""
    import time

    from megatron_ring.rl.sglang_engine import SGLangEngine, _free_port

    (tmp_path / "sglang-gpu2.log").write_text("Loading weights\ntorch.OutOfMemoryError: CUDA out of memory\n")
    (tmp_path / "sglang-gpu2.exit").write_text("1\n")
    monkeypatch.setenv("MEGATRON_RING_SERVER_STATUS", str(tmp_path))
    eng = SGLangEngine([f"http://127.0.0.1:{_free_port()}"], {}, None, "disk", deterministic=False)
    t0 = time.time()
    with pytest.raises(RuntimeError, match=r"(?s)rollout server on gpu2 exited with status 1.*CUDA out of memory"):
        eng.wait_ready(timeout=20)
    assert time.time() - t0 < 10
