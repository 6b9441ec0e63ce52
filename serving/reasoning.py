"""Split a Ring reply into ``reasoning_content`` (inside ``<think>…</think>``) and ``content`` — what SGLang's
``--reasoning-parser deepseek-r1`` does — for whole texts and for streams (a tag may arrive in pieces)."""
from __future__ import annotations

THINK, END = "<think>", "</think>"


def split_reasoning(text: str, strip: bool = True) -> tuple[str | None, str]:
    """(reasoning or None, answer). A reply without ``</think>`` that opened ``<think>`` is all reasoning
    (truncated while thinking); a reply without ``<think>`` is all answer. ``strip=False`` keeps the parts exactly
    as a stream through ``ReasoningStream`` delivers them."""
    p = ReasoningStream()
    r, c = p.feed(text)
    r2, c2 = p.close()
    reasoning, answer = r + r2, c + c2
    if strip:
        reasoning, answer = reasoning.strip(), answer.strip()
    return (reasoning if p.saw_think else None), answer


class ReasoningStream:
    """``feed(delta) -> (reasoning_delta, content_delta)``; holds back only what could be the start of a tag."""

    def __init__(self):
        self.state, self.buf, self.saw_think, self.skip_nl = "start", "", False, False

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning, content = "", ""
        while True:
            if self.skip_nl:  # the newlines right after a tag belong to neither part
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    return reasoning, content
                self.skip_nl = False
            if self.state == "start":  # before the first non-space: does the reply open with <think>?
                s = self.buf.lstrip()
                if not s or (THINK.startswith(s) and len(s) < len(THINK)):
                    return reasoning, content
                if s.startswith(THINK):
                    self.buf, self.state, self.saw_think, self.skip_nl = s[len(THINK):], "reasoning", True, True
                else:
                    self.state = "content"
                continue
            if self.state == "reasoning":
                i = self.buf.find(END)
                if i >= 0:
                    reasoning += self.buf[:i]
                    self.buf, self.state, self.skip_nl = self.buf[i + len(END):], "content", True
                    continue
                keep = _partial_suffix(self.buf, END)
                reasoning += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return reasoning, content
            content += self.buf
            self.buf = ""
            return reasoning, content

    def close(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of ``s`` that is a proper prefix of ``tag``."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0
