"""Near copies of a text, the way reposts and scrapes alter it.

Used by the embedded default's "reposts" source and by the dedup benchmark to plant duplicates whose
kind is known: exact copies, re-cased, whitespace/punctuation noise, a few words reworded, truncated.
"""

from __future__ import annotations

import random

# Small, meaning-preserving substitutions a repost might make.
_SYNONYMS = {
    "how": "in what way", "many": "how much", "what": "which", "find": "work out", "the": "this",
    "calculate": "compute", "answer": "reply", "give": "provide", "number": "count", "word": "term",
    "please": "kindly", "following": "next", "list": "series", "return": "output", "each": "every",
    "write": "produce", "text": "passage", "minimum": "smallest", "steps": "moves", "sort": "order",
}

PERTURBATIONS = ("exact", "recase", "noise", "reword", "truncate")


def recase(text: str, rng: random.Random) -> str:
    mode = rng.choice(("upper", "lower", "title", "swap"))
    return {"upper": text.upper(), "lower": text.lower(), "title": text.title(), "swap": text.swapcase()}[mode]


def noise(text: str, rng: random.Random) -> str:
    """Extra spaces, doubled punctuation, stray line breaks: what copy-paste does to a post."""
    out = []
    for ch in text:
        out.append(ch)
        r = rng.random()
        if ch == " " and r < 0.15:
            out.append(" " * rng.randint(1, 3))
        elif ch in ".,?!:" and r < 0.5:
            out.append(ch)
        elif ch == " " and r < 0.18:
            out.append("\n")
    return ("  " if rng.random() < 0.5 else "") + "".join(out) + rng.choice(("", " ", "!!", " ..."))


def reword(text: str, rng: random.Random, max_changes: int = 1) -> str:
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if w.lower() in _SYNONYMS]
    rng.shuffle(spots)
    for i in spots[:max_changes]:
        words[i] = _SYNONYMS[words[i].lower()]
    if not spots and len(words) > 8:  # nothing to swap: drop one word instead
        del words[rng.randrange(1, len(words) - 1)]
    return " ".join(words)


def truncate(text: str, rng: random.Random, keep: tuple[float, float] = (0.9, 0.97)) -> str:
    cut = max(1, int(len(text) * rng.uniform(*keep)))
    while cut < len(text) and not text[cut - 1].isspace():
        cut += 1
    return text[:cut].rstrip()


def perturb(text: str, kind: str, rng: random.Random) -> str:
    if kind == "exact":
        return text
    if kind == "recase":
        return recase(text, rng)
    if kind == "noise":
        return noise(text, rng)
    if kind == "reword":
        return reword(text, rng)
    if kind == "truncate":
        return truncate(text, rng)
    raise ValueError(f"unknown perturbation {kind!r} (known: {', '.join(PERTURBATIONS)})")
