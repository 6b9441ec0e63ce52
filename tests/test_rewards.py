"""Rewards: Math-Verify on the boxed answer, and the code sandbox against hostile programs — each gets
reward 0 with a reason, the host process survives, nothing is left running or written outside."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ring.rewards import Reward, RewardPool, score
from megatron_ring.rewards.sandbox import UID_BASE, Sandbox, SandboxLimits

from .conftest import PY, ROOT


def test_math_reward_forms():
    ok = lambda resp, ans: score({"domain": "math", "response": resp, "answer": ans})  # noqa: E731
    assert ok("<think>2+2</think>so \\boxed{4}.", "4") == Reward(1.0, "correct")
    assert ok("<think>...</think>\\boxed{\\frac{1}{2}}", "0.5").value == 1.0
    assert ok("<think>...</think>\\boxed{x = -3}", "-3").value == 1.0
    assert ok("<think>\\boxed{7}</think>\\boxed{\\dfrac{6}{4}}", "3/2").value == 1.0  # the last box after </think>
    assert ok("<think>...</think>\\boxed{5}", "4") == Reward(0.0, "wrong_answer")
    assert ok("<think>\\boxed{4}</think> no box here", "4") == Reward(0.0, "no_boxed_answer")
    assert score({"domain": "science", "response": "\\boxed{12}", "answer": "12", "truncated": True}) == \
        Reward(0.0, "truncated")


PROG = "```python\nn = int(input())\nprint(n * 3 + 1)\n```"
TESTS = [{"input": "2\n", "output": "7\n"}, {"input": "-5\n", "output": "-14\n"}]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(cpu_seconds=1, wall_seconds=3.0, memory_bytes=256 << 20, file_bytes=1 << 16,
                                 processes=16))


def test_code_reward_all_tests_must_pass(sandbox):
    assert score({"domain": "code", "response": "<think>easy</think>" + PROG, "test_cases": TESTS}, sandbox) == \
        Reward(1.0, "all_tests_passed")
    wrong = PROG.replace("+ 1", "+ (1 if n > 0 else 0)")
    assert score({"domain": "code", "response": wrong, "test_cases": TESTS}, sandbox) == \
        Reward(0.0, "test_1:wrong_output")
    assert score({"domain": "code", "response": "no code", "test_cases": TESTS}, sandbox).reason == "no_program"


HOSTILE = {
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", {"timeout", "cpu_limit"}),
    "memory_hog": ("x = bytearray(4 << 30)\nprint(len(x))", {"memory_limit"}),
    # (a loaded machine can reach the wall limit before the CPU limit: either kill is the sandbox doing its job)
    "infinite_loop": ("while True:\n    pass", {"cpu_limit", "timeout"}),
    "sleeper": ("import time\ntime.sleep(60)", {"timeout"}),
    "huge_output": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", {"output_limit"}),
    "write_outside": ("open({path!r}, 'w').write('pwned')\nprint(-14)", {"runtime_error"}),
    "write_tmp": ("open('/tmp/mr_sandbox_pwned', 'w').write('x')\nprint(7)", {"wrong_output"}),
    "socket": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint(7)", {"runtime_error"}),
    "daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nelse:\n    print(7)",
               {"wrong_output"}),  # leaves its process group: only the PID namespace's end takes it
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\nprint(7)",
                    {"wrong_output", "runtime_error", "killed", "ok"}),
}


def _ticks_now() -> int:
    """Now, in the clock ticks since boot that /proc/<pid>/stat gives start times in."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _started_since(ticks: int) -> dict[int, tuple[int, str]]:
    """pid -> (uid, PID namespace) of every process started at or after ``ticks``."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                start = int(stat[stat.rindex(")") + 2:].split()[19])
                if start >= ticks:
                    out[int(d.name)] = ((d / "status").stat().st_uid, os.readlink(d / "ns" / "pid"))
            except (OSError, ValueError):  # gone meanwhile
                pass
    return out


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out.update(kids)
        todo += kids
    return out


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_score_zero_and_leave_nothing(sandbox, name, tmp_path):
    src, reasons = HOSTILE[name]
    target = tmp_path / "pwned"
    src = src.format(path=str(target))
    since, host_ns = _ticks_now(), os.readlink("/proc/self/ns/pid")
    t0 = time.time()
    r = score({"domain": "code", "response": f"```python\n{src}\n```", "test_cases": TESTS}, sandbox)
    assert r.value == 0.0 and r.reason.split(":", 1)[1] in reasons, r
    assert time.time() - t0 < 3.0 + 5  # the wall limit (+ start-up) bounds every run
    assert not target.exists() and not Path("/tmp/mr_sandbox_pwned").exists()
    # none of the sandbox's own processes survives its run: those started during it as a sandbox uid or in a
    # PID namespace of their own (processes of the rest of the machine are not counted)
    left = {p: v for p, v in _started_since(since).items() if v[0] >= UID_BASE or v[1] != host_ns}
    assert left == {}, left
    assert score({"domain": "code", "response": PROG, "test_cases": TESTS}, sandbox).value == 1.0  # still works


def test_network_is_really_absent(sandbox):
    r = sandbox.run("import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\n"
                    "print(sorted(n for _, n in socket.if_nameindex()))")
    assert r.status == "ok" and r.stdout.strip() == "['lo']", r


def test_refuses_without_namespaces_unless_unsafe(tmp_path):
    """With no `bwrap` on PATH the sandbox refuses to start; allow_unsafe runs with limits only."""
    code = ("from megatron_ring.rewards.sandbox import Sandbox, SandboxUnavailable\n"
            "try:\n    Sandbox()\n    print('started')\nexcept SandboxUnavailable as e:\n    print('refused:', e)\n"
            "sb = Sandbox(allow_unsafe=True)\nprint('unsafe', sb.isolated, sb.run('print(6*7)').stdout.strip())\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PATH=str(tmp_path)))
    assert "refused: cannot start bubblewrap" in r.stdout, r.stdout + r.stderr
    assert "unsafe False 42" in r.stdout


def test_pool_scores_a_mixed_batch():
    jobs = [{"domain": "math", "response": "\\boxed{4}", "answer": "4"},
            {"domain": "code", "response": PROG, "test_cases": TESTS},
            {"domain": "code", "response": "```python\nwhile True: pass\n```", "test_cases": TESTS},
            {"domain": "other", "response": "hi"}]
    with RewardPool(workers=2, limits=SandboxLimits(cpu_seconds=1, wall_seconds=3.0)) as pool:
        out = pool.map(jobs)
    assert [r.value for r in out] == [1.0, 1.0, 0.0, 0.0]
    assert out[2].reason == "test_0:cpu_limit" and out[3].reason == "no_reward_for_domain:other"


def test_isolation_seen_from_inside(sandbox):
    """What the program itself sees: its own PID namespace (it is process 3 or so: bubblewrap, the runner, it),
    the unprivileged uid 65534 (a sandbox uid on the host: test_sandbox_attacks), and no host folder (here the checkout's
    tests/_artifacts) to write to."""
    import json as _json

    art = ROOT / "tests" / "_artifacts"
    art.mkdir(parents=True, exist_ok=True)
    os.chmod(art, 0o755)
    target = art / "sandbox_pwned"
    target.unlink(missing_ok=True)
    prog = ("import os, json\nr = {'uid': os.getuid(), 'euid': os.geteuid(), 'pid': os.getpid()}\n"
            f"try:\n    open({str(target)!r}, 'w').write('x')\n    r['wrote'] = True\n"
            "except OSError:\n    r['wrote'] = False\nprint(json.dumps(r))\n")
    res = sandbox.run(prog)
    assert res.status == "ok", res
    seen = _json.loads(res.stdout)
    assert seen["pid"] < 10, seen  # a fresh PID namespace: host PIDs are in the thousands
    assert seen["uid"] == seen["euid"] == 65534 and seen["wrote"] is False, seen
    assert not target.exists()


@pytest.mark.parametrize("gold,boxed,value,reason", [
    # units: a bare number matches; two named units must be the same
    ("5 \\text{ m}", "5 \\text{ cm}", 0.0, "unit_mismatch"), ("5 \\text{ cm}", "5", 1.0, "correct"),
    ("5 \\text{ cm}", "5\\,\\mathrm{cm}", 1.0, "correct"),
    # degrees vs percent are units too
    ("45^\\circ", "45\\%", 0.0, "unit_mismatch"), ("45^\\circ", "45", 1.0, "correct"),
    ("90^\\circ", "90^{\\circ}", 1.0, "correct"),
    # a set is not a tuple / interval; set equality is still Math-Verify's
    ("(1,2)", "\\{1,2\\}", 0.0, "container_mismatch"), ("\\{1,2\\}", "\\{2,1\\}", 1.0, "correct"),
    ("[1,2]", "(1,2)", 0.0, "wrong_answer"),
    # one value, several spellings
    ("\\frac13", "0.\\overline{3}", 1.0, "correct"), ("\\frac{7}{6}", "1.1\\overline{6}", 1.0, "correct"),
    ("\\frac{41}{333}", "0.\\overline{123}", 1.0, "correct"), ("\\frac13", "0.33", 0.0, "wrong_answer"),
    ("1000", "1\\,000", 1.0, "correct"), ("1000", "1{,}000", 1.0, "correct"), ("3", "1{,}000", 0.0, "wrong_answer"),
    ("\\emptyset", "\\varnothing", 1.0, "correct"), ("\\emptyset", "\\{\\}", 1.0, "correct"),
    # a number written inside the reference's text with its unit is that number with that unit
    ("\\text{5 cm}", "5", 1.0, "correct"), ("\\text{5 cm}", "5\\,\\mathrm{cm}", 1.0, "correct"),
    ("\\text{5 cm}", "5 \\text{ m}", 0.0, "unit_mismatch"), ("\\text{5 cm}", "6", 0.0, "wrong_answer"),
    ("\\text{1,000 m}", "1000", 1.0, "correct"), ("\\text{12}", "12", 1.0, "correct"),
    # ... in the reference only: an answer naming two values in a text is not the first of them with a "unit"
    ("5", "\\text{5 or 6}", 0.0, "wrong_answer"), ("5", "\\text{5 or six}", 0.0, "wrong_answer"),
])
def test_math_form_decisions(gold, boxed, value, reason):
    """Each misjudgement found by the adversarial trial, decided (megatron_ring/rewards/math_forms.py)."""
    from megatron_ring.rewards.verify_math import math_reward

    assert math_reward(f"The answer is \\boxed{{{boxed}}}.", gold) == Reward(value, reason)


def test_nested_boxes_are_no_answer_and_the_last_top_level_box_counts():
    from megatron_ring.rewards.verify_math import final_answer_text, math_reward

    assert math_reward("\\boxed{\\boxed{7} 8}", "7") == Reward(0.0, "nested_boxed_answer")
    assert math_reward("\\boxed{\\boxed{7} 8}", "78") == Reward(0.0, "nested_boxed_answer")
    assert final_answer_text("first \\boxed{3}, then \\boxed{x^{2}}") == "x^{2}"



def test_an_unclosed_box_after_the_answer_is_a_hedge_and_earns_nothing():
    """The final-answer rule (verify_math's docstring, docs/rewards.md): the last closed box counts, unless a box
    opened after it is never closed: ``\\boxed{right} and \\boxed{wrong`` was graded by the right one."""
    from megatron_ring.rewards.verify_math import UNCLOSED, final_answer_text, math_reward

    assert final_answer_text("<think>\\boxed{1}</think> so \\boxed{2} and \\boxed{") is UNCLOSED
    assert math_reward("so \\boxed{4} and \\boxed{5", "4") == Reward(0.0, "unclosed_boxed_answer")
    assert math_reward("so \\boxed{5} or maybe \\boxed{4}", "4") == Reward(1.0, "correct")  # only the last counts
    assert math_reward("so \\boxed{4} or maybe \\boxed{5}", "4") == Reward(0.0, "wrong_answer")
    assert math_reward("<think>\\boxed{</think> \\boxed{4}", "4") == Reward(1.0, "correct")  # reasoning is not graded
    assert score({"domain": "choice", "response": "\\boxed{B} or \\boxed{C", "answer": "B"}) == \
        Reward(0.0, "unclosed_boxed_answer")


def test_hostile_answers_are_refused_before_any_symbolic_work():
    """Length and bracket depth at their limits (a 40,000-digit number held Math-Verify 8-13 s; brace depth 14 hits
    its 5 s timeout): refused with the reason in well under a second, the limit itself still graded."""
    from megatron_ring.rewards.verify_math import MAX_ANSWER_CHARS, MAX_ANSWER_DEPTH, math_reward

    t0 = time.perf_counter()
    assert math_reward("\\boxed{" + "7" * 40_000 + "}", "7") == Reward(0.0, "answer_too_long")
    assert math_reward("\\boxed{" + "7" * (MAX_ANSWER_CHARS + 1) + "}", "7") == Reward(0.0, "answer_too_long")
    deep = "{" * (MAX_ANSWER_DEPTH + 1) + "1" + "}" * (MAX_ANSWER_DEPTH + 1)
    assert math_reward("\\boxed{" + deep + "}", "1") == Reward(0.0, "answer_too_deep")
    assert math_reward("\\boxed{" + "(" * 7 + "[" * 7 + "1" + "]" * 7 + ")" * 7 + "}", "1") == \
        Reward(0.0, "answer_too_deep")  # every kind of bracket counts
    assert time.perf_counter() - t0 < 1.0
    assert math_reward("\\boxed{" + "7" * MAX_ANSWER_CHARS + "}", "7" * MAX_ANSWER_CHARS) == Reward(1.0, "correct")
    assert math_reward("\\boxed{" + "(" * 6 + "1" + ")" * 6 + "}", "1") == Reward(1.0, "correct")  # within depth


HOSTILE_ANSWER = "\\boxed{9^{9^{9^{9}}}}"  # short and shallow: Math-Verify alone holds it 5 s (its own timeout)


def test_the_pool_bounds_every_grading_kills_the_worker_and_keeps_serving():
    """The trainer's own pool (``RLState._rewards``, the recipe's bounds): a step's jobs with one hostile answer
    finish within the bound (+ the dispatch's slack), the hostile one scores 0 ``grader_timeout``, the honest ones are
    graded, the killed worker is replaced and the next step is graded as usual."""
    from types import SimpleNamespace

    from megatron_ring.rl.config import RLConfig
    from megatron_ring.rl.trainer import RLState

    cfg = RLConfig(reward_workers=2, reward_timeout_s=1.5, code_reward_timeout_s=6.0)
    rows = [{"id": "a", "domain": "math", "answer": "4"}, {"id": "b", "domain": "science", "answer": "4"},
            {"id": "c", "domain": "code", "test_cases": TESTS}]
    responses = [(0, "\\boxed{4}"), (0, HOSTILE_ANSWER), (1, "\\boxed{3}"), (2, PROG), (0, "\\boxed{2+2}")]
    from megatron_ring.rewards import reward_job

    jobs = [reward_job(rows[i], r, False) for i, r in responses]
    with RLState._rewards(SimpleNamespace(cfg=cfg)) as pool:
        assert (pool.timeout_s, pool.code_timeout_s) == (1.5, 6.0)
        pool.map(jobs[:1])  # the workers are up
        for step in range(2):
            t0 = time.perf_counter()
            out = pool.map(jobs)
            took = time.perf_counter() - t0
            assert [(r.value, r.reason) for r in out] == [
                (1.0, "correct"), (0.0, "grader_timeout"), (0.0, "wrong_answer"), (1.0, "all_tests_passed"),
                (1.0, "correct")], (step, out)
            assert took < 1.5 + 1.5, (step, took)  # the bound, not Math-Verify's 5 s
            assert pool.replaced == step + 1


def test_a_worker_killed_from_outside_scores_0_and_is_replaced():
    """A worker that dies (OOM killer, a stray signal) under a code job: that sample scores 0 with the reason, its
    sandbox goes with it and is reaped by the worker's keeper (this machine's PID 1 reaps nothing: an orphan left to
    it stays a zombie), the pool keeps grading."""
    import signal

    slow = "```python\nimport time\nwhile True:\n    time.sleep(0.1)\n```"
    since, host_ns = _ticks_now(), os.readlink("/proc/self/ns/pid")
    with RewardPool(workers=1, limits=SandboxLimits(cpu_seconds=1, wall_seconds=30.0), code_timeout_s=60) as pool:
        fut = pool.submit({"domain": "code", "response": slow, "test_cases": TESTS})
        t0 = time.perf_counter()
        while not pool._workers[0].job and time.perf_counter() - t0 < 60:
            time.sleep(0.05)
        time.sleep(1.0)
        victim = pool._workers[0].pid.value  # the grading process (its keeper stays)
        sandboxed = _descendants(victim)
        assert any(_started_since(since).get(p, (0, host_ns))[1] != host_ns for p in sandboxed), \
            "the program was not running in its sandbox when the worker was killed"
        os.kill(victim, signal.SIGKILL)
        r = fut.result(timeout=30)
        assert r.value == 0.0 and r.reason.startswith("worker_error:died"), r
        assert pool.map([{"domain": "code", "response": PROG, "test_cases": TESTS}])[0].value == 1.0
        time.sleep(0.5)
        left = {p: Path(f"/proc/{p}/stat").read_text().split()[2] for p in sandboxed if Path(f"/proc/{p}").exists()}
        assert not left, f"the killed worker's sandbox is still there (state): {left}"


USR1_TO_THE_RANKS_GROUP = r"""
import json, os, signal, sys, time
from megatron_ring.rewards import RewardPool
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append("USR1"))  # the rank's own handler (training.state.StopFlag)
slow = "```python\nimport time\ntime.sleep(2)\nn = int(input())\nprint(n * 3 + 1)\n```"
tests = json.loads(sys.argv[1])
with RewardPool(workers=2, code_timeout_s=60) as pool:
    futs = [pool.submit({"domain": "code", "response": slow, "test_cases": tests}) for _ in range(2)]
    time.sleep(1.0)
    os.killpg(0, signal.SIGUSR1)  # what torchrun's shutdown does with the job's warning signal: the rank's group
    print(json.dumps({"rewards": [[f.result().value, f.result().reason] for f in futs], "handled": got}))
"""


def test_the_jobs_warning_signal_to_a_ranks_process_group_leaves_its_reward_workers_grading():
    """torchrun passes USR1/USR2 on to each rank's whole process group (``os.killpg``): the rank handles it and
    checkpoints at its step boundary, but a reward worker in that group would die on it (default action) and every
    pending sample would score 0 "worker_error" and be trained on. The workers run in sessions of their own (each
    under its keeper), out of the rank's group: the samples being graded score what they earn."""
    import json

    r = subprocess.run([PY, "-c", USR1_TO_THE_RANKS_GROUP, json.dumps(TESTS)], cwd=ROOT, capture_output=True,
                       text=True, timeout=180, start_new_session=True)  # (a rank: its own process group, as torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["handled"] == ["USR1"] and [v for v, _ in got["rewards"]] == [1.0, 1.0], got
