"""Quality filters of the Ring-Lite-Distill recipe: repetition, truncated reasoning (unclosed
``<think>``, no final answer), invalid LaTeX, image references, answerless items; for RL prompts
also multiple-choice and true/false questions (their rewards are guessable)."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from .io import BATCH, run_filter_step
from .schema import prompt_text, response_text

IMAGE_RE = re.compile(r"!\[[^\]]*\]\(|<img\b|\.(png|jpe?g|gif|svg)\b|\b(as shown in|see|refer to) the (figure|image|"
                      r"diagram|picture)\b|\[image\]|\bin the (figure|image|diagram) (below|above)\b", re.I)
CHOICE_RE = re.compile(r"(^|\n)\s*\(?[A-E][\).:]\s+\S.*(\n\s*\(?[A-E][\).:]\s+\S.*){2,}|which of the following", re.I)
TRUE_FALSE_RE = re.compile(r"\btrue or false\b|\bT/F\b|\b(true|false)\?\s*$", re.I)
BOXED_RE = re.compile(r"\\boxed\{")
CODE_RE = re.compile(r"```")


def repetition(text: str, n: int = 10, max_repeats: int = 4) -> bool:
    """Degenerate looping: some word n-gram occurs more than ``max_repeats`` times."""
    w = text.split()
    if len(w) < n * (max_repeats + 1):
        return False
    c = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return c.most_common(1)[0][1] > max_repeats


def invalid_latex(text: str) -> bool:
    """Unbalanced braces or \\left/\\right, or an odd number of unescaped $ (code spans excluded)."""
    t = re.sub(r"```.*?```", "", text, flags=re.S)
    t = t.replace("\\{", "").replace("\\}", "").replace("\\$", "")
    depth = 0
    for ch in t:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return True
    if depth:
        return True
    if len(re.findall(r"\\left\b", t)) != len(re.findall(r"\\right\b", t)):
        return True
    return t.count("$") % 2 == 1


def sft_verdict(row: dict) -> str | None:
    resp = response_text(row)
    if not resp.strip():
        return "answerless"
    if resp.count("<think>") > resp.count("</think>"):
        return "unclosed_think"
    final = resp.rsplit("</think>", 1)[-1]
    domain = row.get("domain")
    if domain in ("math", "science") and not BOXED_RE.search(final):
        return "no_final_answer"
    if domain == "code" and not CODE_RE.search(final):
        return "no_final_answer"
    if not final.strip():
        return "no_final_answer"
    if repetition(resp):
        return "repetition"
    if IMAGE_RE.search(prompt_text(row)) or IMAGE_RE.search(resp):
        return "image_reference"
    if invalid_latex(prompt_text(row) + "\n" + final):
        return "invalid_latex"
    return None


def rl_verdict(row: dict) -> str | None:
    p = prompt_text(row)
    if row.get("domain") == "code":
        if not row.get("test_cases"):
            return "answerless"
    elif not (row.get("answer") or "").strip():
        return "answerless"
    if CHOICE_RE.search(p):
        return "multiple_choice"
    if TRUE_FALSE_RE.search(p):
        return "true_false"
    if IMAGE_RE.search(p):
        return "image_reference"
    if row.get("domain") != "code" and invalid_latex(p):
        return "invalid_latex"
    return None


def quality_filter(src: str | Path, dst: str | Path, kind: str, batch_size: int = BATCH, progress: bool = True) -> dict:
    verdict = {"sft": sft_verdict, "rl": rl_verdict}[kind]
    return run_filter_step(f"filter[{kind}]", src, dst, lambda rows: [verdict(r) for r in rows], batch_size,
                           progress=progress)
