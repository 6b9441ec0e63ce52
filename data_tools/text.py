"""Text normalisation, hashing and shingles shared by dedup and decontamination."""
from __future__ import annotations

import hashlib
import re
import unicodedata

_NON_WORD = re.compile(r"[^\w+\-*/=^.]+")
# Instructions appended to every prompt of a kind (the Ring-lite math/science suffix): they say nothing
# about the problem and would make every pair of prompts look alike to n-gram and MinHash checks.
BOILERPLATE = ("Please reason step by step, and put your final answer within \\boxed{}.",)


def strip_boilerplate(text: str) -> str:
    for b in BOILERPLATE:
        text = text.replace(b, " ")
    return text


def normalize(text: str) -> str:
    """Boilerplate removed, NFKC, lower case, punctuation (except math operators) to spaces,
    whitespace collapsed."""
    t = unicodedata.normalize("NFKC", strip_boilerplate(text)).lower()
    return " ".join(_NON_WORD.sub(" ", t).split())


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode(), digest_size=8).digest()


def shingles(text: str, k: int) -> list[str]:
    """Word k-grams of the normalised text; a text shorter than k words is one shingle."""
    w = normalize(text).split()
    if len(w) <= k:
        return [" ".join(w)]
    return list({" ".join(w[i:i + k]) for i in range(len(w) - k + 1)})


def ngrams(text: str, n: int) -> set[str]:
    """Word n-grams for contamination checks (a text shorter than n words counts as one gram)."""
    w = normalize(text).split()
    if len(w) < n:
        return {" ".join(w)} if w else set()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}
