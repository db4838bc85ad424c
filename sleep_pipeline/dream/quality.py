"""The quality gate between dreaming and training: what a dream item must pass to be trained on.

In order, the first failing check is the item's recorded reason:

1. ``duplicate``: the same item twice in one dream set;
2. ``empty`` / ``too_long``: an answer with no text, or a prompt (earlier turns included) or answer over
   ``max_chars``;
3. ``no_difference``: a pair whose chosen and rejected answers are the same text;
4. ``verifier``: the task's verifier rejected the chosen answer;
5. ``eval_item`` / ``eval_near_duplicate``: the prompt (or an earlier user turn) is, contains, or nearly
   repeats (MinHash estimate, confirmed by the exact Jaccard similarity of word 3-grams) an item of any
   gate suite, the frozen held-out ones included: an evaluation item that enters training no longer
   measures generalisation;
6. ``in_corpus``: the same request and answer are already in the training corpus (nothing new);
7. reward-hacking guards: ``answer_only`` (a chain of thought that is only its answer line),
   ``degenerate_repetition`` (an answer looping one phrase), ``refuses_benign`` (the preferred answer to
   a request that is not harmful is a refusal).

A seeded sample of the accepted items goes to the rater queue (:mod:`sleep_pipeline.dream.rater`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sleep_pipeline.data.clean import repetition_share
from sleep_pipeline.dream.verify import ANSWER_LINE
from sleep_pipeline.gate.heldout import normalise, request_of

CONTAINED_MIN_CHARS = 24  # an eval request at least this long counts when it occurs inside a dream prompt
SHINGLE_WORDS = 3


@dataclass(frozen=True)
class QualitySpec:
    max_chars: int = 4000
    near_duplicate_jaccard: float = 0.7
    max_repetition: float = 0.5
    refuse_buckets: tuple[str, ...] = ("safety", "privacy")
    rater_sample: int = 8

    def __post_init__(self):
        if not 0 < self.near_duplicate_jaccard <= 1:
            raise ValueError(f"quality.near_duplicate_jaccard must be in (0, 1], got {self.near_duplicate_jaccard}")
        if self.max_chars < 1 or self.rater_sample < 0:
            raise ValueError("quality.max_chars must be >= 1 and quality.rater_sample >= 0")


def suite_prompts(suites_dir: Path | None, include_frozen: bool = True) -> dict[str, str]:
    """Every gate suite item's request, by ``task/id``: the suites of ``suites_dir`` (all its JSONL files)
    and, with ``include_frozen``, the frozen held-out suites as shipped."""
    out: dict[str, str] = {}
    if suites_dir is not None:
        for path in sorted(Path(suites_dir).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    doc = json.loads(line)
                    out[f"{path.stem}/{doc.get('id')}"] = request_of(doc)
    if include_frozen:
        from sleep_pipeline.gate import heldout
        from sleep_pipeline.gate.suites import FROZEN_TASKS

        for task in FROZEN_TASKS:
            for doc in heldout.docs_for(task.name):
                out.setdefault(f"{task.name}/{doc['id']}", request_of(doc))
    return {k: v for k, v in out.items() if v}


def _shingles(text: str) -> set[str]:
    words = normalise(text).split()
    if len(words) < SHINGLE_WORDS:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


class ContaminationGuard:
    """Finds dream prompts that are, contain, or nearly repeat an evaluation item."""

    def __init__(self, eval_prompts: dict[str, str], jaccard: float, num_perm: int = 128):
        from datasketch import MinHash, MinHashLSH

        self._minhash = lambda s: _minhash(MinHash, s, num_perm)
        self.jaccard = jaccard
        self.exact = {}
        self.contained = []
        self.sets = {}
        self.lsh = MinHashLSH(threshold=jaccard, num_perm=num_perm)
        for key, text in eval_prompts.items():
            for symbols in (False, True):
                self.exact.setdefault(normalise(text, symbols), key)
            n = normalise(text)
            if len(n) >= CONTAINED_MIN_CHARS:
                self.contained.append((n, key))
            sh = _shingles(text)
            if sh:
                self.sets[key] = sh
                self.lsh.insert(key, self._minhash(sh))

    def check(self, prompt: str) -> tuple[str, str] | None:
        """(reason, the eval item) when ``prompt`` is contaminated, else None."""
        for symbols in (False, True):
            hit = self.exact.get(normalise(prompt, symbols))
            if hit:
                return "eval_item", hit
        n = normalise(prompt)
        for text, key in self.contained:
            if text in n:
                return "eval_item", key
        sh = _shingles(prompt)
        if not sh:
            return None
        for key in self.lsh.query(self._minhash(sh)):
            other = self.sets[key]
            if len(sh & other) / len(sh | other) >= self.jaccard:
                return "eval_near_duplicate", key
        return None


def _minhash(cls, shingles: set[str], num_perm: int):
    m = cls(num_perm=num_perm, seed=1)
    for s in shingles:
        m.update(s.encode("utf-8"))
    return m


def _answer_only(text: str) -> bool:
    without = ANSWER_LINE.sub("", text)
    return len(re.findall(r"\w+", without)) < 3


def decide(items: list, guard: ContaminationGuard, corpus: Iterable[tuple[str, str]], judge,
           spec: QualitySpec) -> list[tuple[bool, str]]:
    """(accepted, reason) per item, in order (reason ``ok`` when accepted)."""
    known = {(normalise(p), normalise(r)) for p, r in corpus}
    seen: set[str] = set()
    out = []
    for it in items:
        out.append(_decide_one(it, guard, known, seen, judge, spec))
    return out


def _decide_one(it, guard, known, seen, judge, spec) -> tuple[bool, str]:
    if it.item_id in seen:
        return False, "duplicate"
    seen.add(it.item_id)
    if not re.search(r"\w", it.chosen or ""):
        return False, "empty"
    if len(it.prompt) + sum(len(m["content"]) for m in it.history) > spec.max_chars or len(it.chosen) > spec.max_chars or len(it.rejected or "") > spec.max_chars:
        return False, "too_long"
    if it.rejected is not None and it.rejected.strip() == it.chosen.strip():
        return False, "no_difference"
    if it.verified is False:
        return False, "verifier"
    for text in [m["content"] for m in it.history if m["role"] == "user"] + [it.prompt]:  # every user turn
        hit = guard.check(text)
        if hit:
            return False, f"{hit[0]}:{hit[1]}"
    if it.rejected is None and (normalise(it.prompt), normalise(it.chosen)) in known:
        return False, "in_corpus"
    if it.strategy == "self_consistency" and it.meta.get("answer") is not None and _answer_only(it.chosen) \
            and it.bucket in ("reasoning", "basic_recognition", "planning"):
        return False, "answer_only"
    if repetition_share(it.chosen) > spec.max_repetition:
        return False, "degenerate_repetition"
    if it.bucket not in spec.refuse_buckets and it.meta.get("kind") != "attack" and judge.refused(it.prompt, it.chosen):
        return False, "refuses_benign"
    return True, "ok"
