"""The embedded default data: a procedural reasoning domain a tiny model learns on a CPU in minutes.

A programmatic teacher writes long chain-of-thought inside ``<think>…</think>`` and a final
``\\boxed{}`` answer (math: column addition with explicit carries, linear equations; science: one-formula
quantities) or a Python program (code: stdin -> stdout, checked by test cases). Deterministic by seed.
Every item is unique by its normalised question, and each question goes to exactly one split.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

from .text import normalize

SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]


def addition(rng: random.Random) -> dict:
    da, db = rng.randint(1, 4), rng.randint(1, 4)
    a, b = rng.randint(10 ** (da - 1), 10**da - 1), rng.randint(10 ** (db - 1), 10**db - 1)
    s = a + b
    lines, carry = [f"We add {a} and {b} column by column, starting from the ones."], 0
    xa, xb = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xa), len(xb))):
        p, q = int(xa[i]) if i < len(xa) else 0, int(xb[i]) if i < len(xb) else 0
        t = p + q + carry
        extra = f" + {carry}" if carry else ""
        lines.append(f"{PLACES[i]}: {p} + {q}{extra} = {t}, write {t % 10}, carry {t // 10}.")
        carry = t // 10
    if carry:
        lines.append(f"{PLACES[max(len(xa), len(xb))]}: the carry {carry} is written in front.")
    lines.append(f"Reading the digits from the top: {s}.")
    lines.append(f"Check: {s} - {b} = {a}. Correct.")
    return {"domain": "math", "prompt": f"What is {a} + {b}? {SUFFIX}", "answer": str(s),
            "response": "<think>\n" + "\n".join(lines) + f"\n</think>\n{a} + {b} = {s}, so the answer is \\boxed{{{s}}}.",
            "difficulty": (da + db) / 8}


def linear_equation(rng: random.Random) -> dict:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 30), rng.randint(1, 60)
    c = a * x + b
    lines = [f"We want x with {a}x + {b} = {c}.",
             f"Subtract {b} from both sides: {a}x = {c} - {b} = {c - b}.",
             f"Divide both sides by {a}: x = {c - b} / {a} = {x}.",
             f"Check: {a} * {x} + {b} = {a * x} + {b} = {c}. Correct."]
    return {"domain": "math", "prompt": f"Solve for x: {a}x + {b} = {c}. {SUFFIX}", "answer": str(x),
            "response": "<think>\n" + "\n".join(lines) + f"\n</think>\nThe solution is \\boxed{{{x}}}.",
            "difficulty": 0.5}


SCIENCE = [  # (question template, formula text, fn, units)
    ("A car covers {d} m in {t} s. Its speed in m/s?",
     "speed = distance / time", lambda d, t: (d * t, t, d), "m/s"),
    ("Force on a {d} kg mass accelerating at {t} m/s^2, in N?",
     "F = m * a", lambda d, t: (d, t, d * t), "N"),
    ("Voltage across {t} ohms carrying {d} A, in V?",
     "V = I * R", lambda d, t: (d, t, d * t), "V"),
    ("Density of {d} kg in {t} m^3, in kg/m^3?",
     "density = mass / volume", lambda d, t: (d * t, t, d), "kg/m^3"),
]


def science(rng: random.Random) -> dict:
    i = rng.randrange(len(SCIENCE))
    q, formula, fn, unit = SCIENCE[i]
    d, t, ans = fn(rng.randint(2, 200), rng.randint(2, 20))
    op = "/" if "/" in formula else "*"
    lines = [f"The relation is {formula}.", f"Substitute the numbers: {d} {op} {t} = {ans}.",
             f"The unit is {unit}."]
    return {"domain": "science", "prompt": q.format(d=d, t=t) + " " + SUFFIX, "answer": str(ans),
            "response": "<think>\n" + "\n".join(lines) + f"\n</think>\nThe answer is \\boxed{{{ans}}} {unit}.",
            "difficulty": 0.3}


CODE = [  # (description, expression in n, program line)
    ("n * {a} + {b}", lambda n, a, b: n * a + b),
    ("n * n + {b}", lambda n, a, b: n * n + b),
    ("(n + {a}) * {b}", lambda n, a, b: (n + a) * b),
    ("n - {a} * {b}", lambda n, a, b: n - a * b),
]


def code(rng: random.Random) -> dict:
    i = rng.randrange(len(CODE))
    tmpl, fn = CODE[i]
    a, b = rng.randint(2, 30), rng.randint(1, 99)
    expr = tmpl.format(a=a, b=b)
    tests = [{"input": f"{n}\n", "output": f"{fn(n, a, b)}\n"} for n in rng.sample(range(-50, 100), 4)]
    prog = f"n = int(input())\nprint({expr})"
    return {"domain": "code",
            "prompt": f"Code: read integer n, print {expr}.",
            "test_cases": tests,
            "response": (f"<think>\nRead n as an integer, compute {expr} and print it.\n"
                         f"For n = 3 this gives {fn(3, a, b)}.\n</think>\n```python\n{prog}\n```"),
            "difficulty": 0.4}


WORDS = ("apple river cloud stone light music green seven table water paper glass honey tiger maple "
         "north ocean pearl storm sugar").split()


def other(rng: random.Random) -> dict:
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        k = rng.randint(2, 9)
        return {"domain": "other", "prompt": f"Repeat the word {w} {k} times.",
                "response": f"<think>\nThe word is {w}; write it {k} times.\n</think>\n{' '.join([w] * k)}"}
    return {"domain": "other", "prompt": f"Spell the word {w} backwards.",
            "response": f"<think>\nThe letters of {w} are {' '.join(w)}; reversed: {' '.join(w[::-1])}.\n</think>\n{w[::-1]}"}


GENERATORS: dict[str, list[Callable[[random.Random], dict]]] = {
    "math": [addition, addition, linear_equation], "science": [science], "code": [code], "other": [other]}


def unique_items(domain: str, seed: int) -> Iterator[dict]:
    """An endless stream of items of one domain, unique by normalised prompt."""
    rng = random.Random(f"{seed}:{domain}")
    seen: set[str] = set()
    gens = GENERATORS[domain]
    misses = 0
    while misses < 10000:
        item = rng.choice(gens)(rng)
        key = normalize(item["prompt"])
        if key in seen:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        yield item


def take(it: Iterator[dict], n: int) -> list[dict]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            raise ValueError(f"the generator ran out of unique items after {len(out)} (asked {n})") from None
    return out


def sft_row(item: dict, i: int) -> dict:
    return {"id": f"sft-{item['domain']}-{i}", "domain": item["domain"], "source": "teacher",
            "messages": [{"role": "user", "content": item["prompt"]},
                         {"role": "assistant", "content": item["response"]}]}


def rl_row(item: dict, i: int, split: str) -> dict:
    return {"id": f"{split}-{item['domain']}-{i}", "prompt": item["prompt"], "domain": item["domain"],
            "answer": item.get("answer"), "test_cases": item.get("test_cases"),
            "difficulty": item.get("difficulty"), "source": "synthetic"}
