"""Math and science rewards: the final ``\\boxed{}`` answer checked with Math-Verify against the reference
(0/1, no format reward; a truncated response scores 0, as in the paper)."""
from __future__ import annotations

import re

from . import Reward

_THINK_END = "</think>"
_BOXED = re.compile(r"\\boxed\s*\{")


def final_answer_text(response: str) -> str | None:
    """The text after the reasoning that holds the last ``\\boxed{...}`` (balanced braces), or None."""
    tail = response.split(_THINK_END)[-1]
    starts = [m.end() for m in _BOXED.finditer(tail)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(tail)):
        depth += {"{": 1, "}": -1}.get(tail[j], 0)
        if depth == 0:
            return tail[i:j]
    return None


def math_reward(response: str, answer: str, truncated: bool = False) -> Reward:
    from math_verify import parse, verify

    if truncated:
        return Reward(0.0, "truncated")
    boxed = final_answer_text(response)
    if boxed is None:
        return Reward(0.0, "no_boxed_answer")
    gold = parse("\\boxed{" + str(answer) + "}")
    pred = parse("\\boxed{" + boxed + "}")
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
    m = _LETTER.match(boxed)
    if not m:
        return Reward(0.0, "not_a_letter")
    return Reward(1.0, "correct") if m.group(1).upper() == answer.strip().upper() else Reward(0.0, "wrong_answer")
