"""What Math-Verify is not asked to decide: answer forms that it equates or separates wrongly, settled before it
runs (each decision is tested in tests/test_rewards.py::test_math_form_decisions).

- Units: a bare number matches a number with a unit (Math-Verify strips units), but two answers that both name a
  unit must name the same one (``5 \\text{ cm}`` is not ``5 \\text{ m}``). A number written inside the text with
  its unit in a reference (``\\text{5 cm}``) is that number with that unit (in an answer it stays text).
- Degrees and percent are units too: ``45^\\circ`` is not ``45\\%`` (either matches a bare 45).
- Containers: a set ``\\{1,2\\}`` is not a tuple or interval ``(1,2)``; Math-Verify still decides set equality
  (``\\{1,2\\}`` = ``\\{2,1\\}``) and open/closed intervals.
- Same values written differently are made one form first: repeating decimals (``0.\\overline{3}`` -> ``\\frac{1}{3}``),
  thin spaces or ``{,}`` between digit groups (``1\\,000`` -> ``1000``), ``\\varnothing`` / ``\\{\\}`` -> ``\\emptyset``.
"""
from __future__ import annotations

import re
from fractions import Fraction

_TEXT_NUMBER = re.compile(r"\\(?:text|mathrm|textrm|mbox)\s*\{\s*([-+]?\d+(?:,\d{3})*(?:\.\d+)?)(?:\s*([A-Za-z][^{}]*?))?\s*\}")
_UNIT = re.compile(r"\\(?:text|mathrm|textrm|mbox|operatorname)\s*\{([^{}]*)\}")
_DEG = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_PCT = re.compile(r"\\?%")
_GROUP_SEP = re.compile(r"(?<=\d)(?:\\[,!;: ]|\{,\}|~|\\thinspace\s*)(?=\d{3}(?!\d))")
_REPEAT = re.compile(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}")
_EMPTY = re.compile(r"\\varnothing|\\left\\\{\s*\\right\\\}|\\\{\s*\\\}")


def _repeating(m: re.Match) -> str:
    whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
    value = Fraction(int(whole)) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
    value += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}" if value.denominator != 1 else str(value.numerator)


def _text_number(m: re.Match) -> str:
    number, unit = m.group(1).replace(",", ""), m.group(2)
    return f"{number} \\text{{ {unit}}}" if unit else number


def normalise(s: str, reference: bool = False) -> str:
    """One form for one value. ``reference``: also read a number written inside a text with its unit
    (``\\text{5 cm}``) as that number with that unit: for the data's answers only, never the policy's, where
    ``\\text{5 or 6}`` would become 5 with a "unit" and earn the reward of 5."""
    if reference:
        s = _TEXT_NUMBER.sub(_text_number, s)
    s = _GROUP_SEP.sub("", s)
    s = _EMPTY.sub(r"\\emptyset", s)
    return _REPEAT.sub(_repeating, s)


def units(s: str) -> frozenset[str]:
    """The units an answer names: words in \\text{} / \\mathrm{}, degrees, percent."""
    out = {re.sub(r"\s+", "", u).lower().rstrip(".") for u in _UNIT.findall(s)}
    out.discard("")
    if _DEG.search(s):
        out.add("degree")
    if _PCT.search(s):
        out.add("percent")
    return frozenset(out)


def container(s: str) -> str | None:
    """'set' for \\{...\\}, 'ordered' for (...) / [...] holding a comma, else None."""
    t = re.sub(r"\\left|\\right|\s", "", s)
    if t.startswith("\\{") and t.endswith("\\}"):
        return "set"
    if t[:1] in "([" and t[-1:] in ")]" and "," in t:
        return "ordered"
    return None


def form_mismatch(gold: str, pred: str) -> str | None:
    """A reason the two cannot be equal whatever their values, or None (then Math-Verify decides)."""
    gu, pu = units(gold), units(pred)
    if gu and pu and gu != pu:
        return "unit_mismatch"
    gc, pc = container(gold), container(pred)
    if gc and pc and gc != pc:
        return "container_mismatch"
    return None
