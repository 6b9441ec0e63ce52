"""The code reward: the last fenced program of the answer (after the reasoning) runs in one sandbox on
every test case (the expected outputs stay here); reward 1 only if all pass (outputs compared line by line,
trailing spaces ignored).
``function_reward`` is the HumanEval form: the answer's function on the check's inputs, the check's asserts outside."""
from __future__ import annotations

import re

from . import Reward
from .sandbox import Sandbox

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.S)


def extract_program(response: str) -> str | None:
    blocks = _FENCE.findall(response.split("</think>")[-1])
    return blocks[-1] if blocks else None


def _same(out: str, expected: str) -> bool:
    norm = lambda s: [ln.rstrip() for ln in s.strip().splitlines()]  # noqa: E731
    return norm(out) == norm(expected)


def code_reward(response: str, test_cases: list[dict], sandbox: Sandbox, truncated: bool = False) -> Reward:
    if truncated:
        return Reward(0.0, "truncated")
    program = extract_program(response)
    if program is None:
        return Reward(0.0, "no_program")
    if not test_cases:
        return Reward(0.0, "no_test_cases")
    runs = sandbox.run_many(program, [case.get("input", "") for case in test_cases], stop_on_error=True)
    for i, (case, r) in enumerate(zip(test_cases, runs)):
        if r.status != "ok":
            return Reward(0.0, f"test_{i}:{r.status}")
        if not _same(r.stdout, case.get("output", "")):
            return Reward(0.0, f"test_{i}:wrong_output")
    return Reward(1.0, "all_tests_passed")


def function_reward(response: str, prefix: str, check: str, entry_point: str, sandbox: Sandbox,
                    truncated: bool = False, reference: str | None = None) -> Reward:
    """1 if the answer's ``entry_point`` returns, on every input the ``check`` uses, data for which all of the
    check's asserts hold (``function_check``: the check runs here, the answer in the sandbox). An answer that
    repeats the function follows the whole stub (its imports and helper functions stay defined); one that gives
    only the body is appended to the stub."""
    from .function_check import harness, parse_results, recorded_calls, replay_check

    if truncated:
        return Reward(0.0, "truncated")
    if not reference:
        return Reward(0.0, "grader_error: no reference solution to take the check's inputs from")
    code = extract_program(response)
    if code is None:
        return Reward(0.0, "no_program")
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M):
        program = f"{prefix}\n    pass\n\n{code}"  # the stub's helpers, then the answer's definitions
    else:
        program = prefix + code
    calls = recorded_calls(reference, check, entry_point)
    r = sandbox.run(harness(program, entry_point), repr(calls))
    if r.status != "ok":
        last = (r.stderr.strip().splitlines() or [""])[-1][:120]
        return Reward(0.0, f"check:{r.status}" + (f": {last}" if last else ""))
    results = parse_results(r.stdout, calls)
    if results is None:
        return Reward(0.0, "check:no_results")
    why = replay_check(prefix, check, entry_point, results)
    return Reward(1.0, "all_tests_passed") if why is None else Reward(0.0, f"check:{why}")
