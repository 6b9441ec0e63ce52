"""HumanEval-style grading by data, not by exit status (EvalPlus does the same).

The candidate never runs beside the tests. Three steps:
1. Trusted, in this process: the benchmark's ``check`` runs against the reference solution through a recorder,
   which notes every argument tuple the check passes (the check's ``random`` is seeded, so its draws repeat).
2. Untrusted, in the sandbox: the stub (with its helper functions), then the answer, then a harness that calls the
   answer's entry function on those arguments and prints the results as plain literals. The expected outputs,
   the asserts and the check's source never enter the sandbox; exiting early or with status 0 earns nothing.
3. Trusted again: the check runs once more, the entry function replaced by a lookup of the sandbox's results
   (parsed as literals only: an object whose ``__eq__`` is always True cannot come back). It passes only if every
   assert holds.
"""
from __future__ import annotations

import ast
import copy
import functools
import random

HARNESS = '''
import copy as _c, sys as _s
_calls = eval(_s.stdin.read(), {"__builtins__": {}}, {"inf": float("inf"), "nan": float("nan")})
_out = []
for _a in _calls:
    try:
        _out.append(("ok", @ENTRY@(*_c.deepcopy(_a))))
    except BaseException as _e:  # noqa
        _out.append(("error", type(_e).__name__))
_s.__stdout__.write("\\n@MARKER@" + repr(_out) + "\\n")
_s.__stdout__.flush()
'''
MARKER = "@@megatron-ring-results@@"


class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, {}

    def __call__(self, *args):
        self.calls.setdefault(repr(args), copy.deepcopy(args))
        return self.fn(*args)


class _Replay:
    def __init__(self, results: dict):
        self.results = results

    def __call__(self, *args):
        key = repr(args)
        if key not in self.results:
            raise LookupError("the check made a call the reference did not")
        kind, value = self.results[key]
        if kind != "ok":
            raise RuntimeError(f"the answer raised {value}")
        return copy.deepcopy(value)


def _run_check(namespace: dict, check: str) -> None:
    state = random.getstate()
    random.seed(1234)
    try:
        exec(compile(check, "<check>", "exec"), namespace)  # noqa: S102 — the benchmark's own, trusted code
    finally:
        random.setstate(state)


@functools.lru_cache(maxsize=512)  # per problem, not per sample: every sample of a problem gets the same inputs
def recorded_calls(reference: str, check: str, entry_point: str) -> tuple[tuple, ...]:
    ns: dict = {"__name__": "__reference__"}
    exec(compile(reference, "<reference>", "exec"), ns)  # noqa: S102 — the benchmark's reference solution
    rec = _Recorder(ns[entry_point])
    ns[entry_point] = rec
    _run_check(ns, check)
    return tuple(rec.calls.values())


def harness(program: str, entry_point: str) -> str:
    return program + "\n" + HARNESS.replace("@ENTRY@", entry_point).replace("@MARKER@", MARKER)


def _plain(node):
    """ast.literal_eval plus inf / nan (repr of floats): data only."""
    if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
        return float(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _plain(node.operand)
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.Tuple):
        return tuple(_plain(x) for x in node.elts)
    if isinstance(node, ast.List):
        return [_plain(x) for x in node.elts]
    if isinstance(node, ast.Set):
        return {_plain(x) for x in node.elts}
    if isinstance(node, ast.Dict):
        return {_plain(k): _plain(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def parse_results(stdout: str, calls: tuple[tuple, ...]) -> dict | None:
    """{repr(args): (kind, value)} from the harness's last line, or None when it is absent or not plain data."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        return None
    try:
        out = _plain(ast.parse(lines[-1][len(MARKER):], mode="eval").body)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None
    if not isinstance(out, list) or len(out) != len(calls):
        return None
    return {repr(a): tuple(r) for a, r in zip(calls, out) if isinstance(r, tuple) and len(r) == 2}


def replay_check(prefix: str, check: str, entry_point: str, results: dict) -> str | None:
    """None when every assert of the check holds on the recorded results, else the reason."""
    ns: dict = {"__name__": "__check__"}
    exec(compile(prefix, "<stub>", "exec"), ns)  # noqa: S102 — the benchmark's stub (helpers), trusted
    ns[entry_point] = _Replay(results)
    try:
        _run_check(ns, check)
    except AssertionError:
        return "wrong_output"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"[:120]
    return None
