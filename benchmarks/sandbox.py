"""Code-reward sandbox throughput: the same programs and test cases run four ways, side by side.

- ``python3``: unsandboxed, one `python3 main.py < input` per test case (the floor: no isolation at all);
- ``before``: the sandbox as of --before-rev (default 6cae987: `unshare` + a jail under the venv's python + the
  program's python, per test case), rebuilt from git into a scratch folder;
- ``after, 1 test/sandbox``: today's sandbox (bubblewrap) started once per test case (its start-up cost);
- ``after``: today's sandbox as the code reward uses it: one sandbox per program, every test case inside it.

Prints per-test-case latency (median, p90, in ms), programs/s one at a time and with one worker per CPU, and the
ratios against ``python3`` and ``before``; every way must give the same outputs. One command:
``.venv/bin/python benchmarks/sandbox.py`` (``--programs 24 --tests 8``).

``--rl-stage2 runs/tiny/rl_stage1`` also runs ``--rl-steps`` steps of RL stage 2 (recipe rl_stage2_tiny, code +
science, from that checkpoint) with today's tree and with --before-rev's (a git worktree), the same seeds, and
prints the share of each step spent scoring rewards (``time/reward``) beside generate / train / sync."""
from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ring.rewards.pool import cpu_workers  # noqa: E402
from megatron_ring.rewards.sandbox import Sandbox, SandboxLimits, _interpreter  # noqa: E402

PROGRAMS = [  # (source, input generator): the kinds of solutions a code RL stage grades
    ("n = int(input())\nprint(sum(map(int, input().split())) * n)",
     lambda r: f"{r.randint(1, 9)}\n{' '.join(str(r.randint(-99, 99)) for _ in range(50))}\n"),
    ("import sys\nxs = sorted(map(int, sys.stdin.read().split()))\nprint(*xs)",
     lambda r: " ".join(str(r.randint(0, 10**6)) for _ in range(500)) + "\n"),
    ("n = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, (a + b) % 1000000007\nprint(a)",
     lambda r: f"{r.randint(1000, 20000)}\n"),
    ("s = input()\nprint(s[::-1], len(set(s)))", lambda r: "".join(r.choice("abcxyz") for _ in range(200)) + "\n"),
    ("from collections import Counter\nc = Counter(input().split())\nprint(*sorted(c.items())[:5])",
     lambda r: " ".join(r.choice(["a", "b", "c", "dd", "ee"]) for _ in range(300)) + "\n"),
    ("n = int(input())\nsieve = bytearray([1]) * (n + 1)\nsieve[0:2] = b'\\x00\\x00'\n"
     "for i in range(2, int(n ** 0.5) + 1):\n    if sieve[i]:\n        sieve[i*i::i] = bytearray(len(sieve[i*i::i]))\n"
     "print(sum(sieve))", lambda r: f"{r.randint(10**4, 10**5)}\n"),
    ("import math\nq = int(input())\nfor _ in range(q):\n"
     "    a, b = map(int, input().split())\n    print(math.gcd(a, b))",
     lambda r: "20\n" + "".join(f"{r.randint(1, 10**9)} {r.randint(1, 10**9)}\n" for _ in range(20))),
    ("n, m = map(int, input().split())\ng = [list(map(int, input().split())) for _ in range(n)]\n"
     "print(sum(map(sum, g)), max(map(max, g)))",
     lambda r: "10 10\n" + "".join(" ".join(str(r.randint(0, 9)) for _ in range(10)) + "\n" for _ in range(10))),
    ("amount = int(input())\ncoins = [1, 5, 10, 25]\ndp = [0] + [10**9] * amount\nfor c in coins:\n"
     "    for v in range(c, amount + 1):\n        dp[v] = min(dp[v], dp[v - c] + 1)\nprint(dp[amount])",
     lambda r: f"{r.randint(100, 5000)}\n"),
    ("import bisect\nxs = sorted(map(int, input().split()))\nt = int(input())\nprint(bisect.bisect_left(xs, t))",
     lambda r: " ".join(str(r.randint(0, 1000)) for _ in range(100)) + f"\n{r.randint(0, 1000)}\n"),
    ("import heapq\nxs = list(map(int, input().split()))\nprint(heapq.nsmallest(3, xs))",
     lambda r: " ".join(str(r.randint(0, 1000)) for _ in range(200)) + "\n"),
    ("import itertools\nn = int(input())\nprint(sum(1 for p in itertools.permutations(range(n)) if p[0] < p[-1]))",
     lambda r: f"{r.randint(3, 7)}\n"),
]


def make_programs(n: int, tests: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    r = random.Random(seed)
    return [(PROGRAMS[i % len(PROGRAMS)][0], [PROGRAMS[i % len(PROGRAMS)][1](r) for _ in range(tests)])
            for i in range(n)]


def load_before(rev: str, scratch: Path):
    """The sandbox module as of ``rev`` (its _jail.py beside it), importable from a scratch folder."""
    for f in ("sandbox.py", "_jail.py"):
        text = subprocess.run(["git", "show", f"{rev}:megatron_ring/rewards/{f}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
        (scratch / f).write_text(text)
    spec = importlib.util.spec_from_file_location("sandbox_before", scratch / "sandbox.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_before"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def run_python3(program: str, inputs: list[str]) -> tuple[list[str], list[float]]:
    outs, lat = [], []
    with tempfile.TemporaryDirectory() as td:
        (Path(td) / "main.py").write_text(program)
        for s in inputs:
            t0 = time.perf_counter()
            outs.append(subprocess.run([_interpreter(), "-I", "main.py"], input=s, capture_output=True, text=True,
                                       cwd=td, timeout=30).stdout)
            lat.append(time.perf_counter() - t0)
    return outs, lat


def per_test(fn, program: str, inputs: list[str]) -> tuple[list[str], list[float]]:
    outs, lat = [], []
    for s in inputs:
        t0 = time.perf_counter()
        outs.append(fn(program, s).stdout)
        lat.append(time.perf_counter() - t0)
    return outs, lat


def per_program(sb: Sandbox, program: str, inputs: list[str]) -> tuple[list[str], list[float]]:
    t0 = time.perf_counter()
    res = sb.run_many(program, inputs)
    dt = (time.perf_counter() - t0) / len(inputs)
    return [r.stdout for r in res], [dt] * len(inputs)


def measure(name: str, fn, progs, workers: int) -> dict:
    t0 = time.perf_counter()
    results = [fn(p, i) for p, i in progs]
    seq = len(progs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda pi: fn(*pi), progs))
    par = len(progs) / (time.perf_counter() - t0)
    lat = sorted(x for _, ls in results for x in ls)
    return {"name": name, "outs": [o for o, _ in results], "median_ms": 1e3 * statistics.median(lat),
            "p90_ms": 1e3 * lat[int(0.9 * (len(lat) - 1))], "seq": seq, "par": par}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--programs", type=int, default=24)
    ap.add_argument("--tests", type=int, default=8)
    ap.add_argument("--before-rev", default="6cae987")
    ap.add_argument("--workers", type=int, default=0, help="concurrent sandboxes (0: one per CPU)")
    ap.add_argument("--rl-stage2", metavar="INIT", help="also time RL stage-2 steps from this checkpoint/run")
    ap.add_argument("--rl-steps", type=int, default=4)
    a = ap.parse_args()
    workers = a.workers or cpu_workers()
    progs = make_programs(a.programs, a.tests)
    lim = SandboxLimits(cpu_seconds=5, wall_seconds=10.0)
    after = Sandbox(lim)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rows.append(measure("python3 (unsandboxed, per test case)", run_python3, progs, workers))
        try:
            old = load_before(a.before_rev, d)
            before = old.Sandbox(old.SandboxLimits(cpu_seconds=5, wall_seconds=10.0))
            rows.append(measure(f"before ({a.before_rev}: unshare, per test case)",
                                lambda p, i: per_test(before.run, p, i), progs, workers))
        except (subprocess.CalledProcessError, Exception) as e:  # noqa: BLE001 — no git history here
            print(f"(no 'before' column: {type(e).__name__}: {e})", file=sys.stderr)
        rows.append(measure("after, 1 test/sandbox", lambda p, i: per_test(after.run, p, i), progs, workers))
        rows.append(measure("after (bubblewrap, 1 sandbox/program)", lambda p, i: per_program(after, p, i), progs,
                            workers))
    for r in rows[1:]:
        assert r["outs"] == rows[0]["outs"], f"{r['name']} gave other outputs than python3"
    base = rows[0]["median_ms"]
    bef = next((r["median_ms"] for r in rows if r["name"].startswith("before")), None)
    print(f"\n{a.programs} programs x {a.tests} test cases; {workers} concurrent workers; {after.describe()}\n")
    print("| way | per-test median ms | p90 ms | programs/s (1 at a time) | programs/s (concurrent) "
          "| median vs python3 | median vs before |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs_b = f"{bef / r['median_ms']:.1f}x lower" if bef else "-"
        print(f"| {r['name']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['seq']:.2f} | {r['par']:.2f} "
              f"| {r['median_ms'] / base:.2f}x | {vs_b} |")
    if a.rl_stage2:
        rl_stage2(a.rl_stage2, a.rl_steps, a.before_rev)


def rl_stage2(init: str, steps: int, rev: str) -> None:
    """time/* of ``steps`` RL stage-2 steps, today's tree vs ``rev``'s, side by side."""
    import json
    import os

    def run(tree: Path, out: Path) -> list[dict]:
        data = ROOT / "runs" / "tiny" / "data"
        cmd = [sys.executable, "-m", "megatron_ring.cli", "rl", "--recipe", "rl_stage2_tiny",
               "--init", str(Path(init).resolve()),
               "--out", str(out), "--prompts", str(data / "rl_stage2" / "4_filtered.parquet"),
               "--tokenizer", str(data / "tokenizer"), "--eval-sets", str(data / "eval" / "code.parquet"),
               "--eval-limit", "4", "--eval-interval", "0", "--max-steps", str(steps), "--save-interval", "0"]
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
        subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        subprocess.run(["git", "worktree", "add", "-f", "--detach", str(d / "before"), rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rows = {f"before ({rev})": run(d / "before", d / "out_before"), "after": run(ROOT, d / "out_after")}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(d / "before")], cwd=ROOT, capture_output=True)
    parts = ["generate", "reward", "train", "sync"]
    print(f"\nRL stage 2 (rl_stage2_tiny from {init}), mean of {steps} steps, seconds:\n")
    print("| tree | " + " | ".join(parts) + " | step | reward share | reward/mean |")
    print("|---|" + "---|" * (len(parts) + 3))
    for name, recs in rows.items():
        t = {p: statistics.mean(r[f"time/{p}"] for r in recs) for p in parts}
        total = sum(t.values())
        rew = statistics.mean(r["reward/mean"] for r in recs)
        print(f"| {name} | " + " | ".join(f"{t[p]:.2f}" for p in parts) +
              f" | {total:.2f} | {100 * t['reward'] / total:.0f} % | {rew:.3f} |")


if __name__ == "__main__":
    main()
