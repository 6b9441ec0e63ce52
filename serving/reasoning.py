"""Split a Ring reply into ``reasoning_content`` and ``content``, for whole texts and for streams (a tag may arrive
in pieces): what SGLang's ``--reasoning-parser deepseek-r1`` (the project's SGLang launches) gives for the same
text, to the character. That parser forces reasoning: everything before ``</think>`` is reasoning (a leading
``<think>`` dropped), everything after it the answer, every newline kept; a reply that never writes ``</think>`` (a
model that answers without thinking, or one cut off while thinking) is all reasoning and its ``content`` is empty.
tests/test_sglang_parts.py runs SGLang's own parser beside this one on the same decoded token ids."""
from __future__ import annotations

THINK, END = "<think>", "</think>"


def split_reasoning(text: str, strip: bool = True) -> tuple[str | None, str]:
    """(reasoning or None when there is none, answer). ``strip=False`` keeps the parts exactly as SGLang's parser
    and a stream through ``ReasoningStream`` deliver them."""
    p = ReasoningStream()
    r, c = p.feed(text)
    r2, c2 = p.close()
    reasoning, answer = r + r2, c + c2
    if strip:
        reasoning, answer = reasoning.strip(), answer.strip()
    return (reasoning or None), answer


class ReasoningStream:
    """``feed(delta) -> (reasoning_delta, content_delta)``; holds back only what could be the start of a tag."""

    def __init__(self):
        self.state, self.buf = "start", ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning, content = "", ""
        while True:
            if self.state == "start":  # a reply that opens with <think> (once or more): the tag is dropped
                if not self.buf or (THINK.startswith(self.buf) and len(self.buf) < len(THINK)):
                    return reasoning, content
                if self.buf.startswith(THINK):
                    self.buf = self.buf[len(THINK):]
                    continue
                self.state = "reasoning"
                continue
            if self.state == "reasoning":
                i = self.buf.find(END)
                if i >= 0:
                    reasoning += self.buf[:i]
                    self.buf, self.state = self.buf[i + len(END):], "content"
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
        if self.state in ("start", "reasoning"):
            return rest, ""
        return "", rest


def _partial_suffix(s: str, tag: str) -> int:
    """Length of the longest suffix of ``s`` that is a proper prefix of ``tag``."""
    for n in range(min(len(s), len(tag) - 1), 0, -1):
        if s.endswith(tag[:n]):
            return n
    return 0
