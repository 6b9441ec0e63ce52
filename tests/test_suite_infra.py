"""The test suite's own machinery (tests/conftest.py), which the CI time budget rests on: an artefact shared by
conftest.shared is built once however many tests (or xdist workers) ask for it, a failed build is not taken as
built, a case of a shared torchrun world (conftest.world) that fails fails its own test, naming what ran not, and
scripts/test.sh fails a test phase over its time budget."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, case_ok, read_json, shared, world
from .test_parallel_parity import _args


def test_shared_artefacts_are_built_once(tmp_path_factory, tmp_path, monkeypatch):
    builds = []

    def build(d):
        builds.append(d)
        (d / "made").write_text(str(len(builds)))

    a = shared(tmp_path_factory, "infra-once", build)
    b = shared(tmp_path_factory, "infra-once", build)
    assert a == b and len(builds) == 1 and (a / "made").read_text() == "1"

    def broken(d):
        (d / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        shared(tmp_path_factory, "infra-broken", broken)
    d = shared(tmp_path_factory, "infra-broken", build)  # tried again from an empty folder
    assert not (d / "half").exists() and (d / "made").exists()

    # under xdist every worker has its own basetemp: the artefact lives beside them, so other workers find it
    class Worker:  # a worker's factory, its basetemp inside this test's folder
        def __init__(self, name):
            self.base = tmp_path / name

        def getbasetemp(self):
            self.base.mkdir(exist_ok=True)
            return self.base

    n = len(builds)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    c = shared(Worker("popen-gw0"), "infra-worker", build)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert shared(Worker("popen-gw1"), "infra-worker", build) == c == tmp_path / "shared-infra-worker"
    assert len(builds) == n + 1  # built by the first worker only


def test_a_failing_case_of_a_shared_world_fails_its_own_test_and_names_the_rest(tiny, tmp_path):
    """The shared-world machinery itself (conftest.world): a case that raises is reported with its error, the world
    ends there (its other ranks would wait in its collectives) and the cases after it say they did not run."""
    cases = [{"id": "first", "run": "module:megatron_ring.cli", "args": _args(tiny, tmp_path / "a.json", "x", [])},
             {"id": "broken", "run": "module:megatron_ring.cli",
              "args": ["verify", "--hf", tmp_path / "no_such_folder", "--ckpt", tiny["mcore"]]},
             {"id": "after", "run": "module:megatron_ring.cli", "args": _args(tiny, tmp_path / "b.json", "x", [])}]
    results = world(1, cases, tmp_path / "w")
    assert results["first"] == "ok" and read_json(tmp_path / "a.json")["ok"]
    assert "no_such_folder" in results["broken"], results["broken"]
    assert results["after"].startswith("not run") and not (tmp_path / "b.json").exists()
    with pytest.raises(AssertionError, match="case broken of the shared torchrun world"):
        case_ok(results, "broken")


def test_the_test_command_fails_past_its_time_budget():
    """scripts/test.sh (README command 2, CI's) with a budget of 0 s: the tests pass, the run fails naming the
    figures; with room it passes."""
    def run(budget):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
        return subprocess.run(["bash", "scripts/test.sh", "-q", "-p", "no:cacheprovider", "tests/test_c3po.py"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(env, TEST_BUDGET_S=str(budget), TEST_WORKERS="0",
                                       VENV=str(Path(sys.executable).parents[1])))  # (this venv: also from a copy)

    over = run(0)
    assert over.returncode == 1 and " passed" in over.stdout, over.stdout[-2000:] + over.stderr[-2000:]
    assert "over its budget of 0 s" in over.stderr, over.stderr[-2000:]
    ok = run(600)
    assert ok.returncode == 0 and "over its budget" not in ok.stderr, ok.stderr[-2000:]
