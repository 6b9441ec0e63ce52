"""One typed Arrow schema per kind of row, and the row validator used by ``ingest``."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

DOMAINS = ("math", "code", "science")
ROLES = ("system", "user", "assistant")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
TEST_CASE = pa.struct([("input", pa.string()), ("output", pa.string())])

SFT_SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.list_(MESSAGE)), ("domain", pa.string()),
                        ("source", pa.string())])
RL_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("domain", pa.string()),
                       ("answer", pa.string()), ("test_cases", pa.list_(TEST_CASE)),
                       ("difficulty", pa.float64()), ("source", pa.string())])
QUARANTINE_SCHEMA = pa.schema([("file", pa.string()), ("row", pa.int64()), ("reason", pa.string()),
                               ("raw", pa.string())])
SCHEMAS = {"sft": SFT_SCHEMA, "rl": RL_SCHEMA}


class BadRow(ValueError):
    """A row that cannot become a typed row; ``reason`` is a short stable code for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _str(row: dict, field: str, required: bool = True) -> str | None:
    if field not in row or row[field] is None:
        if required:
            raise BadRow(f"missing_field:{field}")
        return None
    v = row[field]
    if not isinstance(v, str):
        raise BadRow(f"wrong_type:{field}", f"expected string, got {type(v).__name__}")
    return v


def validate_sft(row: dict[str, Any], default_id: str) -> dict[str, Any]:
    msgs = row.get("messages")
    if msgs is None:
        raise BadRow("missing_field:messages")
    if not isinstance(msgs, list):
        raise BadRow("wrong_type:messages", f"expected list, got {type(msgs).__name__}")
    if not msgs:
        raise BadRow("empty_messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRow("wrong_type:messages", f"message {i} is {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRow("bad_role", f"message {i} role {role!r}")
        if not isinstance(content, str):
            raise BadRow("wrong_type:messages.content", f"message {i}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise BadRow("empty_answer", "no non-empty assistant turn")
    domain = _str(row, "domain", required=False) or "other"
    return {"id": str(row.get("id") or default_id), "messages": out, "domain": domain,
            "source": _str(row, "source", required=False) or ""}


def validate_rl(row: dict[str, Any], default_id: str) -> dict[str, Any]:
    prompt = _str(row, "prompt")
    if not prompt.strip():
        raise BadRow("empty_prompt")
    domain = _str(row, "domain")
    if domain not in DOMAINS:
        raise BadRow("bad_domain", f"{domain!r} not in {DOMAINS}")
    answer, tests = None, None
    if domain == "code":
        tests = row.get("test_cases")
        if tests is None:
            raise BadRow("missing_field:test_cases")
        if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
            raise BadRow("wrong_type:test_cases", "expected a list of {input, output}")
        if not tests:
            raise BadRow("empty_answer", "no test cases")
        for i, t in enumerate(tests):
            if not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
                raise BadRow("wrong_type:test_cases", f"test {i} needs string input and output")
        tests = [{"input": t["input"], "output": t["output"]} for t in tests]
    else:
        answer = row.get("answer")
        if answer is None:
            raise BadRow("missing_field:answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise BadRow("wrong_type:answer", f"expected string, got {type(answer).__name__}")
        if not answer.strip():
            raise BadRow("empty_answer")
    diff = row.get("difficulty")
    if diff is not None and (isinstance(diff, bool) or not isinstance(diff, (int, float))):
        raise BadRow("wrong_type:difficulty", f"expected number, got {type(diff).__name__}")
    return {"id": str(row.get("id") or default_id), "prompt": prompt, "domain": domain, "answer": answer,
            "test_cases": tests, "difficulty": None if diff is None else float(diff),
            "source": _str(row, "source", required=False) or ""}


VALIDATORS = {"sft": validate_sft, "rl": validate_rl}


def prompt_text(row: dict[str, Any]) -> str:
    """The text a row is deduplicated / decontaminated on: the question."""
    if "prompt" in row and row["prompt"] is not None:
        return row["prompt"]
    return "\n".join(m["content"] for m in row.get("messages") or [] if m["role"] == "user")


def response_text(row: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in row.get("messages") or [] if m["role"] == "assistant")
