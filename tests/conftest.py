import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: a torch process with an OpenMP team of 2 then shares its cores with the other worker,
    # and libgomp's barriers wait for descheduled threads (measured: the eval tests 6x slower, 649 s instead of ~100).
    # One thread per process here and in everything the tests start (children inherit it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MP = ROOT / "tests" / "mp"


def cli(*args, check=True, timeout=300):
    """Run the ``megatron-ring`` CLI in a fresh process (megatron's global parallel state stays out
    of the pytest process)."""
    r = subprocess.run([PY, "-m", "megatron_ring.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"megatron-ring {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_cmd(nproc: int, *target_and_args) -> list[str]:
    return [PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", *map(str, target_and_args)]


def run_session(cmd: list, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in a session of its own, its output through files; once it exits (or times out: returncode None) the
    whole session is killed. A rank that dies leaves children (multiprocessing workers) whose copies of a pipe would
    keep ``subprocess.run(capture_output=True)`` waiting for the whole timeout."""
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as o, tempfile.TemporaryFile("w+") as e:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=o, stderr=e, text=True, start_new_session=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        o.seek(0)
        e.seek(0)
        return subprocess.CompletedProcess(cmd, rc, o.read(), e.read())


def torchrun(script: str, nproc: int, *args, timeout=600) -> subprocess.CompletedProcess:
    """``script``: a file in tests/mp, or ``-m module`` style as 'module:megatron_ring.cli'."""
    target = ["-m", script.split(":", 1)[1]] if script.startswith("module:") else [str(MP / script)]
    cmd = _torchrun_cmd(nproc, *target, *args)
    r = run_session(cmd, timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def shared(tmp_path_factory, name: str, build) -> Path:
    """An expensive artefact built once per test session and shared: the folder ``name`` under the session's
    temporary root, filled by ``build(folder)``. Under pytest-xdist every worker asks for it; the first one builds
    it (the others wait on a file lock) and all use the same folder, so the artefact is built once per run, not
    once per worker or module. A build that fails leaves nothing marked done (the next asker tries again)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    d = root / f"shared-{name}"
    with FileLock(str(d) + ".lock"):
        if not (d / ".built").exists():
            if d.exists():
                import shutil

                shutil.rmtree(d)
            d.mkdir(parents=True)
            build(d)
            (d / ".built").touch()
    return d


def _build_tiny(d: Path) -> None:
    cli("init", "--recipe", "tiny", "--out", d / "hf", "--seed", "3")
    cli("convert", "hf-to-mcore", "--hf", d / "hf", "--out", d / "mcore")
    cli("convert", "mcore-to-hf", "--ckpt", d / "mcore", "--out", d / "hf_export", "--tokenizer", d / "hf")


def world(nproc: int, cases: list[dict], d: Path, timeout=900) -> dict[str, str]:
    """One torchrun launch of ``nproc`` ranks running ``cases`` in turn (tests/mp/worlds.py): where several tests need
    the same world size only to check different layouts or properties, they share the launch and each still gets
    its own pytest result through :func:`case_ok`. Returns {case id: "ok" | what went wrong} (every case present)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "plan.json").write_text(json.dumps(cases, default=str))
    cmd = _torchrun_cmd(nproc, MP / "worlds.py", d / "plan.json", d / "report")
    r = run_session(cmd, timeout)
    why = f"torchrun exit {r.returncode}" if r.returncode is not None else f"the world timed out after {timeout} s"
    tail = f"({why})\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    ranks = [json.loads(f.read_text()) for f in sorted(d.glob("report.rank*.json"))]
    out = {}
    for c in cases:
        said = [rk.get(c["id"]) for rk in ranks]
        bad = [x for x in said if x not in (None, "ok")]
        if bad:
            out[c["id"]] = f"{bad[0]}\n{tail}"
        elif len(ranks) == nproc and all(x == "ok" for x in said):
            out[c["id"]] = "ok"
        else:
            out[c["id"]] = f"not run (an earlier case of the same world failed, or the world died)\n{tail}"
    return out


def case_ok(results: dict[str, str], case_id: str) -> None:
    """Fail this test with its case's own error when the shared world's case did not pass."""
    if results[case_id] != "ok":
        raise AssertionError(f"case {case_id} of the shared torchrun world: {results[case_id]}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A random tiny HF checkpoint (with tokenizer), its megatron dist checkpoint, and the export back."""
    d = shared(tmp_path_factory, "tiny", _build_tiny)
    return {"root": d, "hf": d / "hf", "mcore": d / "mcore", "export": d / "hf_export"}


RL_DATA_SIZES = {"eval": {"math": 8, "code": 4, "science": 4}, "rl_stage1": {"math": 40},
                 "rl_stage2": {"code": 8, "science": 8}, "sft": 100}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The small embedded default data set the RL tests read (prompts, tokenizer, eval sets)."""
    from data_tools.default import build_default

    return shared(tmp_path_factory, "rldata", lambda d: build_default(d, seed=3, seq_len=256, sizes=RL_DATA_SIZES))


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    """The SFT tests' packed data (400 rows of the embedded default, sequences of 256)."""
    from data_tools.default import build_default

    sizes = {"eval": {"math": 10, "code": 5, "science": 5}, "rl_stage1": {"math": 10},
             "rl_stage2": {"code": 5, "science": 5}, "sft": 400}
    d = shared(tmp_path_factory, "sftdata", lambda d: build_default(d, seed=2, seq_len=256, sizes=sizes))
    return d / "sft" / "packed.parquet"


@pytest.fixture(scope="session")
def servers(tiny, tmp_path_factory):
    """Two CPU rollout servers (serving/native.py, SGLang's native API) over the tiny export (context 256 tokens),
    under deterministic inference; shared by test_transport and test_sglang_lookalike (one unit: one worker)."""
    d = tmp_path_factory.mktemp("native")
    started = [native_server(tiny["export"], d / f"s{i}", "--enable-deterministic-inference") for i in range(2)]
    yield [url for url, _ in started]
    for _, p in started:
        p.terminate()
        p.wait(timeout=30)


def native_server(export, d: Path, *flags) -> tuple[str, subprocess.Popen]:
    """A CPU rollout server (``python -m serving.native``, context 256) on a free port: (its URL, its process);
    its stderr in ``d/log``."""
    from serving.health import bound_port, wait_healthy

    d.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([PY, "-m", "serving.native", "--model-path", str(export), "--port", "0", "--port-file",
                          str(d / "port"), "--context-length", "256", *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=open(d / "log", "w"))
    url = f"http://127.0.0.1:{bound_port(d / 'port', p)}"
    wait_healthy(url, p, timeout=120, interval=0.2)
    return url, p


def teach_tiny(tiny: dict, chats: list[tuple[str, str]], d: Path, steps: int = 120, lr: float = 3e-3) -> Path:
    """The random tiny model taught ``chats`` [(question, reply)] (plain PyTorch on the HF model), written as a HF
    checkpoint, converted to a megatron checkpoint and exported back by ``megatron-ring convert mcore-to-hf``:
    a servable folder whose greedy replies are the taught ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ring.convert.hf_io import write_hf_checkpoint

    tok = AutoTokenizer.from_pretrained(tiny["export"])
    model = AutoModelForCausalLM.from_pretrained(tiny["export"], trust_remote_code=True, dtype=torch.float32)
    torch.manual_seed(0)
    batch = []
    for q, a in chats:
        p = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                    return_dict=False)
        r = tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]
        batch.append((torch.tensor([p + r]), len(p)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for ids, n in batch:
            labels = ids.clone()
            labels[:, :n] = -100
            loss = loss + model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) / len(batch) < 0.05, f"the tiny model did not learn its replies: loss {float(loss):.3f}"
    cfg = json.loads((tiny["export"] / "config.json").read_text())
    write_hf_checkpoint({k: v.detach() for k, v in model.state_dict().items()}, cfg, d / "taught")
    cli("convert", "hf-to-mcore", "--hf", d / "taught", "--out", d / "mcore")
    cli("convert", "mcore-to-hf", "--ckpt", d / "mcore", "--out", d / "export", "--tokenizer", tiny["hf"])
    return d / "export"


def read_json(p):
    return json.loads(Path(p).read_text())


# ---------------------------------------------------------------- running on both cores (pytest-xdist)
# scripts/test.sh runs the suite on 2 pytest-xdist workers. Each module is one unit of work, run whole by one worker
# (its module fixtures are built once); modules that must not run beside each other share a unit (TOGETHER). Units
# are handed out longest first (MODULE_SECONDS: measured on the 2-core CI machine, rounded), so the two workers end
# at about the same time; a module missing from the table counts as short. (xdist's own `loadgroup` marks do not
# group under pytest 9, which no longer reads the node id xdist rewrites: the scheduler below groups instead.)
TOGETHER = {  # the sandbox tests look for *any* sandbox process / uid / SysV segment on the host: one worker runs them
    "test_sandbox_attacks": "sandbox", "test_rewards": "sandbox", "test_eval": "sandbox",
    "test_transport": "transport", "test_sglang_lookalike": "transport",  # (one pair of CPU servers: `servers`)
}
MODULE_SECONDS = {  # wall seconds of each module under `scripts/test.sh` (2-core CI machine, 2026-12-06)
    "test_rl_trainer": 405, "test_transport": 280, "test_slurm": 280, "test_sft_trainer": 250, "test_eval": 110,
    "test_sglang_lookalike": 70,
    "test_published_configs": 145, "test_conversion_memory": 105, "test_serving": 100, "test_hf_compat": 75,
    "test_slurm_two_nodes": 170,
    "test_slurm_plan": 70, "test_rl_loss": 50, "test_gpu_check": 45, "test_memory_plan": 45, "test_train_step": 40,
    "test_sandbox_attacks": 35, "test_weight_sync": 30, "test_parallel_parity": 30, "test_conversion": 25,
    "test_suite_infra": 15, "test_rewards": 30, "test_serving_batch": 25, "test_cli_output": 11, "test_transport_parts": 11,
}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def _unit(nodeid: str) -> str:
    return TOGETHER.get(_module(nodeid), _module(nodeid))


def pytest_collection_modifyitems(config, items):
    cost: dict[str, float] = {}
    for m in {_module(it.nodeid) for it in items}:
        cost[_unit(m)] = cost.get(_unit(m), 0.0) + MODULE_SECONDS.get(m, 1.0)
    first: dict[str, int] = {}
    for i, it in enumerate(items):
        first.setdefault(_unit(it.nodeid), i)
    items.sort(key=lambda it: (-cost[_unit(it.nodeid)], first[_unit(it.nodeid)]))  # stable: a module keeps its order


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        """xdist's loadscope with the units above as scopes, in the collection's (longest-first) order."""

        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    return ByUnit(config, log)
