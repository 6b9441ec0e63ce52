"""Math and science rewards: the final ``\\boxed{}`` answer checked with Math-Verify against the reference
(0/1, no format reward; a truncated response scores 0, as in the paper).

The final-answer rule (one place: ``final_answer_text``; docs/rewards.md): the answer is the content of the last
top-level ``\\boxed{...}`` after the reasoning (``</think>``), the rightmost box as Math-Verify's own extraction takes
it; only that box is graded, so writing several boxes cannot pay more than writing the last one. A ``\\boxed{`` that
is never closed after it makes the answer unparseable (score 0): ``\\boxed{right} or \\boxed{wrong`` is a hedge, not
an answer. Before any symbolic work the answer must pass ``precheck`` (length and bracket depth: the parser's time
grows with both, exponentially with depth); the reward pool bounds what remains in wall time."""
from __future__ import annotations

import re

from . import Reward
from .math_forms import form_mismatch, normalise

_THINK_END = "</think>"
_BOXED = re.compile(r"\\boxed\s*\{")


MAX_ANSWER_CHARS = 1000  # longer final answers are not parsed (a 40,000-digit number held Math-Verify 8-13 s)
MAX_ANSWER_DEPTH = 12  # nested {, (, [ (brace depth 12 parses in ~2 s, 14 hits Math-Verify's 5 s timeout)
UNCLOSED = "unclosed_boxed_answer"


def final_answer_text(response: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}`` after the reasoning (balanced braces; a box inside
    another box is part of that box's content), None without one, ``UNCLOSED`` when a ``\\boxed{`` after the last
    closed box is never closed."""
    tail = response.split(_THINK_END)[-1]
    found, pos = None, 0
    while (m := _BOXED.search(tail, pos)) is not None:
        i, depth = m.end(), 1
        for j in range(i, len(tail)):
            depth += {"{": 1, "}": -1}.get(tail[j], 0)
            if depth == 0:
                found, pos = tail[i:j], j + 1
                break
        else:  # opened and never closed: a hedge after the answer, or no answer at all
            return UNCLOSED
    return found


def precheck(answer: str) -> str | None:
    """A reason not to parse ``answer`` at all (too long, nested too deep), or None."""
    if len(answer) > MAX_ANSWER_CHARS:
        return "answer_too_long"
    depth = deepest = 0
    for ch in answer:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth -= 1
    return "answer_too_deep" if deepest > MAX_ANSWER_DEPTH else None


def math_reward(response: str, answer: str, truncated: bool = False) -> Reward:
    from math_verify import parse, verify

    if truncated:
        return Reward(0.0, "truncated")
    boxed = final_answer_text(response)
    if boxed is None:
        return Reward(0.0, "no_boxed_answer")
    if boxed is UNCLOSED:
        return Reward(0.0, UNCLOSED)
    if (why := precheck(boxed)) is not None:
        return Reward(0.0, why)
    if _BOXED.search(boxed):  # \boxed{\boxed{7} 8}: which is the answer? neither
        return Reward(0.0, "nested_boxed_answer")
    gold_text, pred_text = normalise(str(answer), reference=True), normalise(boxed)
    mismatch = form_mismatch(gold_text, pred_text)
    if mismatch:
        return Reward(0.0, mismatch)
    gold = parse("\\boxed{" + gold_text + "}")
    pred = parse("\\boxed{" + pred_text + "}")
    if not pred:
        return Reward(0.0, "unparsable_answer")
    return Reward(1.0, "correct") if verify(gold, pred) else Reward(0.0, "wrong_answer")


_LETTER = re.compile(r"^\s*(?:\\text\{)?\(?([A-Da-d])\)?\}?\s*$")


def choice_reward(response: str, answer: str, truncated: bool = False) -> Reward:
    """Multiple choice (GPQA): the boxed letter (``\\boxed{B}``, ``\\boxed{(b)}``, ``\\boxed{\\text{B}}``) equals
    the reference letter."""
    if truncated:
        return Reward(0.0, "truncated")
    boxed = final_answer_text(response)
    if boxed is None:
        return Reward(0.0, "no_boxed_answer")
    if boxed is UNCLOSED:
        return Reward(0.0, UNCLOSED)
    m = _LETTER.match(boxed)
    if not m:
        return Reward(0.0, "not_a_letter")
    return Reward(1.0, "correct") if m.group(1).upper() == answer.strip().upper() else Reward(0.0, "wrong_answer")
