"""The slowest math gradings over a generated family of hostile answers, before and after the bound.

- ``before``: the grader as it was (Math-Verify on the last box, no pre-check, no bound but Math-Verify's own 5 s
  alarms), each answer in a fresh process (killed at ``--cap`` seconds so this benchmark ends: shown as ``>cap``);
- ``after``: what the RL trainer and ``megatron-ring eval`` do now: the answer pre-check, then the reward pool with
  its wall-time bound (``--bound``, the recipes' ``reward_timeout_s``): the seconds from submitting the job to its
  reward, the worker killed and replaced past the bound.

Families: long numbers, deep nesting (braces, parentheses), huge exponents, long sums, many boxes, a factorial.
Prints one table (seconds and reasons, side by side) and the worst case of each way against the bound. One command:
``.venv/bin/python benchmarks/reward_worst_case.py`` (``--bound 5 --cap 180``; ``--quick`` for the smaller half)."""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_ring.rewards import RewardPool  # noqa: E402


def family(quick: bool) -> list[tuple[str, str, str]]:
    """(name, response, reference): mostly one box holding the hostile answer."""
    digits = (5_000, 20_000) if quick else (5_000, 20_000, 40_000, 80_000)
    out = [(f"long number, {n:,} digits", "7" * n, "5") for n in digits]
    out += [(f"long number = reference, {n:,} digits", "7" * n, "7" * n) for n in digits[:2]]
    out += [(f"nested braces, depth {d}", "{" * d + "1" + "}" * d, "1") for d in (12, 16, 24)]
    out += [(f"nested parentheses, depth {d}", "(" * d + "1" + ")" * d, "1") for d in (20, 60)]
    out += [(f"nested fractions, depth {d}", "\\frac{1}{" * d + "2" + "}" * d, "2") for d in (30,)]
    out += [("exponent tower 9^9^9^9", "9^{9^{9^{9}}}", "4"), ("10^{10^{100}}", "10^{10^{100}}", "4"),
            ("factorial 1000000!", "1000000!", "4")]
    out += [(f"long sum, {n:,} terms", "+".join(["x"] * n), "5") for n in ((300,) if quick else (300, 3_000))]
    out = [(name, "\\boxed{" + answer + "}", ref) for name, answer, ref in out]
    return out + [(f"many boxes, {n:,}", "".join(f"\\boxed{{{i}}} or " for i in range(n)) + "\\boxed{5}", "5")
                  for n in (10_000,) + (() if quick else (100_000,))]


def _unbounded(conn, response: str, reference: str) -> None:
    """The grader without the pre-check (the state before the bound) in this fresh process."""
    logging.disable(logging.CRITICAL)
    from megatron_ring.rewards import verify_math

    verify_math.precheck = lambda _: None
    verify_math.math_reward("\\boxed{1}", "1")  # imports and parser warm-up are not the answer's time
    t0 = time.perf_counter()
    r = verify_math.math_reward(response, reference)
    conn.send((time.perf_counter() - t0, r.reason))


def before(response: str, reference: str, cap: float) -> tuple[float | None, str]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_unbounded, args=(child, response, reference))
    p.start()
    got = parent.recv() if parent.poll(cap + 20) else None  # (+ the process start and warm-up)
    p.kill()
    p.join()
    return got if got else (None, f"still running at {cap:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bound", type=float, default=5.0, help="reward_timeout_s (the recipes' default: 5)")
    ap.add_argument("--cap", type=float, default=180.0, help="stop a 'before' grading after this long")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    rows = []
    with RewardPool(workers=2, timeout_s=a.bound) as pool:
        pool.map([{"domain": "math", "response": "\\boxed{1}", "answer": "1"}])  # the workers are up
        for name, response, ref in family(a.quick):
            b_s, b_why = before(response, ref, a.cap)
            t0 = time.perf_counter()
            r = pool.map([{"domain": "math", "response": response, "answer": ref}])[0]
            rows.append((name, b_s, b_why, time.perf_counter() - t0, r.reason))
            print(f"  {name}: before {'>%.0f' % a.cap if b_s is None else '%.2f' % b_s} s ({b_why}), "
                  f"after {rows[-1][3]:.2f} s ({r.reason})", file=sys.stderr, flush=True)
    fmt = lambda s: f">{a.cap:.0f}" if s is None else f"{s:.2f}"  # noqa: E731
    print(f"\n| hostile answer | before s | before: reason | after s (bound {a.bound:g} s) | after: reason |"
          " after vs before |")
    print("|---|---|---|---|---|---|")
    for name, b_s, b_why, a_s, a_why in sorted(rows, key=lambda r: -(r[1] if r[1] is not None else 1e9)):
        ratio = f"{(b_s if b_s is not None else a.cap) / a_s:.1f}x faster" if a_s > 0 else "-"
        print(f"| {name} | {fmt(b_s)} | {b_why} | {a_s:.2f} | {a_why} | {ratio} |")
    worst_b = max((r[1] if r[1] is not None else float("inf")) for r in rows)
    worst_a = max(r[3] for r in rows)
    print(f"\nworst single grading: before {fmt(None if worst_b == float('inf') else worst_b)} s, after "
          f"{worst_a:.2f} s = {worst_a / a.bound:.2f}x the bound ({a.bound:g} s; the target: <= 2x)")
    return 0 if worst_a <= 2 * a.bound else 1


if __name__ == "__main__":
    sys.exit(main())
