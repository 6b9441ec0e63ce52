"""Math and science rewards: the final ``\\boxed{}`` answer checked with Math-Verify against the reference
(0/1, no format reward; a truncated response scores 0, as in the paper)."""
from __future__ import annotations

import re

from . import Reward
from .math_forms import form_mismatch, normalise

_THINK_END = "</think>"
_BOXED = re.compile(r"\\boxed\s*\{")


def final_answer_text(response: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}`` after the reasoning (balanced braces; a box inside
    another box is part of that box's content), or None."""
    tail = response.split(_THINK_END)[-1]
    found, pos = None, 0
    while (m := _BOXED.search(tail, pos)) is not None:
        i, depth = m.end(), 1
        for j in range(i, len(tail)):
            depth += {"{": 1, "}": -1}.get(tail[j], 0)
            if depth == 0:
                found, pos = tail[i:j], j + 1
                break
        else:  # unclosed: no answer here
            break
    return found


def math_reward(response: str, answer: str, truncated: bool = False) -> Reward:
    from math_verify import parse, verify

    if truncated:
        return Reward(0.0, "truncated")
    boxed = final_answer_text(response)
    if boxed is None:
        return Reward(0.0, "no_boxed_answer")
    if _BOXED.search(boxed):  # \boxed{\boxed{7} 8}: which is the answer? neither
        return Reward(0.0, "nested_boxed_answer")
    mismatch = form_mismatch(str(answer), boxed)
    if mismatch:
        return Reward(0.0, mismatch)
    gold = parse("\\boxed{" + normalise(str(answer)) + "}")
    pred = parse("\\boxed{" + normalise(boxed) + "}")
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
