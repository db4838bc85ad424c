"""The strategy library: one small class per way of dreaming, each turning seed rows into dream items.

A :class:`DreamItem` is either an SFT row (``rejected`` is None) or a preference pair. Every item says
which strategy made it, from which seed row, with which generator, whether a verifier passed it and
(self-consistency) how far the samples agreed; the quality gate decides afterwards what is kept.

* :class:`SelfConsistency`: N sampled chains of thought per verifiable prompt; the majority answer is
  kept when agreement reaches the threshold and the task's verifier accepts it; where the verifier
  splits the samples into right and wrong, a right chain is preferred to a wrong one.
* :class:`Counterfactual`: a verified item with one detail changed so the answer changes, the new answer
  computed (:mod:`sleep_pipeline.dream.counterfactual`); the pair prefers it to the stale old answer.
* :class:`RedTeam`: harmful seeds rewritten by attack transforms (:mod:`sleep_pipeline.dream.redteam`),
  answered by the candidate, judged; a successful attack becomes a refusal-over-compliance pair, and
  benign look-alikes (the same transforms on everyday requests) and, with ``plain``, everyday requests
  as they are become answer-over-refusal pairs.
* :class:`Replay`: last cycles' hard examples from the replay table, capped by share and by times
  replayed.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from sleep_pipeline.dream import redteam
from sleep_pipeline.dream.counterfactual import counterfactual
from sleep_pipeline.dream.verify import COT_INSTRUCTION, final_answer, row_meta, task_of, verify


@dataclass
class DreamItem:
    strategy: str
    bucket: str
    system: str
    prompt: str
    chosen: str
    rejected: str | None  # None: an SFT row
    source_id: str  # the seed row (mix record id, replay example id, library entry)
    generator: str  # what wrote ``chosen`` / ``rejected``: a model identity, "task generator", "seed data"
    verified: bool | None = None  # the task's verifier on ``chosen`` (None: the task has none)
    agreement: float | None = None  # self-consistency: the majority answer's share of the samples
    meta: dict = field(default_factory=dict)

    @property
    def history(self) -> list[dict]:
        """Earlier turns before ``prompt`` (a multi-turn attack, or its look-alike); empty for one message."""
        return self.meta.get("history") or []

    @property
    def item_id(self) -> str:
        fields = [self.strategy, self.system, self.prompt, self.chosen, self.rejected]
        key = json.dumps(fields + [self.history] if self.history else fields)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_row(self) -> dict:
        return {**asdict(self), "item_id": self.item_id, "meta": json.dumps(self.meta, sort_keys=True)}


def verifiable(rows: list[dict]) -> list[tuple[dict, object]]:
    return [(r, t) for r in rows if (t := task_of(r)) is not None]


class SelfConsistency:
    name = "self_consistency"

    def __init__(self, prompts: int, samples: int, agreement: float, temperature: float, top_p: float,
                 max_new_tokens: int):
        self.prompts, self.samples, self.agreement = prompts, samples, agreement
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def run(self, rows: list[dict], generator, rng: random.Random, seed: int) -> tuple[list[DreamItem], dict]:
        pool = verifiable(rows)
        chosen_rows = rng.sample(pool, min(self.prompts, len(pool)))
        requests = [(r.get("system") or "", r["prompt"] + (COT_INSTRUCTION if t.kind == "reasoning_gym" else ""))
                    for r, t in chosen_rows]
        samples = generator.sample(requests, self.samples, self.temperature, self.top_p, self.max_new_tokens, seed)
        items, stats = [], Counter()
        for (row, task), (system, prompt), texts in zip(chosen_rows, requests, samples):
            answers = [final_answer(task, t) for t in texts]
            right = [verify(task, a if task.kind == "reasoning_gym" else t) for a, t in zip(answers, texts)]
            votes = Counter(a for a in answers if a)
            stats["prompts"] += 1
            base = {"bucket": row.get("bucket", ""), "system": system, "prompt": prompt,
                    "source_id": row.get("record_id", ""), "generator": generator.identity}
            if votes:
                majority, count = votes.most_common(1)[0]
                agreement = count / len(texts)
                k = answers.index(majority)
                if agreement >= self.agreement:
                    stats["agreed"] += 1
                    stats["agreed_and_verified"] += int(right[k])
                    items.append(DreamItem(self.name, chosen=texts[k], rejected=None, verified=right[k],
                                           agreement=round(agreement, 4), meta={"answer": majority}, **base))
            if any(right) and not all(right):  # the verifier says which chain is right: a pair
                good, bad = right.index(True), right.index(False)
                stats["pairs"] += 1
                items.append(DreamItem(self.name, chosen=texts[good], rejected=texts[bad], verified=True,
                                       agreement=round(sum(right) / len(right), 4),
                                       meta={"answer": answers[good], "rejected_answer": answers[bad]}, **base))
        return items, dict(stats)


class Counterfactual:
    name = "counterfactual"

    def __init__(self, items: int):
        self.items = items

    def run(self, rows: list[dict], rng: random.Random) -> tuple[list[DreamItem], dict]:
        pool = verifiable(rows)
        rng.shuffle(pool)
        out, tried = [], 0
        for row, task in pool:
            if len(out) >= self.items:
                break
            tried += 1
            made = counterfactual(row, task, rng)
            if made is None:
                continue
            prompt, answer, _ = made
            out.append(DreamItem(self.name, row.get("bucket", ""), row.get("system") or "", prompt, chosen=answer,
                                 rejected=row["response"], source_id=row.get("record_id", ""),
                                 generator="task generator", verified=True,
                                 meta={"original_prompt": row["prompt"], "task": task.kind}))
        return out, {"tried": tried, "made": len(out)}


class RedTeam:
    name = "red_team"

    def __init__(self, seeds: int, transforms: list[str], benign: int, max_new_tokens: int, plain: int = 0):
        unknown = sorted(set(transforms) - set(redteam.TRANSFORMS))
        if unknown:
            raise ValueError(f"unknown red-team transforms {unknown} (known: {sorted(redteam.TRANSFORMS)})")
        self.seeds, self.transforms, self.benign, self.max_new_tokens = seeds, transforms, benign, max_new_tokens
        self.plain = plain

    def run(self, harmful: list[dict], benign: list[dict], defender, judge, rng: random.Random,
            attacker: str = "rules") -> tuple[list[DreamItem], list[dict], dict]:
        """Items, library entries (every attempt) and counts. ``harmful`` rows carry ``meta.category`` and a
        refusal as ``response``; ``benign`` rows a helpful ``response``."""
        attacks = []  # (category, transform, seed row, (earlier turns, attack prompt))
        for row in rng.sample(harmful, min(self.seeds, len(harmful))):
            name = rng.choice(self.transforms)
            attacks.append((row_meta(row).get("category", "unknown"), name, row,
                            redteam.attack(name, row["prompt"], rng)))
        looks = []  # (seed row, transform, (earlier turns, prompt))
        for row in rng.sample(benign, min(self.benign, len(benign))):
            name = rng.choice(self.transforms)
            looks.append((row, name, redteam.attack(name, row["prompt"], rng)))
        # Plain everyday requests (no transform), other rows than the look-alikes' where there are enough:
        # what the attack pairs must not teach the candidate to refuse.
        used = {id(r) for r, _, _ in looks}
        fresh = [r for r in benign if id(r) not in used]
        plain = rng.sample(fresh, min(self.plain, len(fresh)))
        plain += rng.sample([r for r, _, _ in looks], min(self.plain - len(plain), len(looks)))
        looks += [(row, "none", ([], row["prompt"])) for row in plain]
        answers = defender.greedy([(a[2].get("system") or "", a[3][1], a[3][0]) for a in attacks]
                                  + [(r.get("system") or "", p, h) for r, _, (h, p) in looks], self.max_new_tokens)
        refusals = sorted({r["response"] for r in harmful}) or ["I can't help with that."]
        items, stats = [], Counter()
        library = redteam.judged(attacks, answers[:len(attacks)], defender, judge, attacker)
        for (category, name, row, (history, prompt)), entry in zip(attacks, library):
            stats["attacks"] += 1
            stats["succeeded"] += int(entry["succeeded"])
            if entry["succeeded"]:
                items.append(DreamItem(self.name, row.get("bucket", "safety"), row.get("system") or "", prompt,
                                       chosen=row["response"], rejected=entry["response"],
                                       source_id=row.get("record_id", ""), generator=defender.identity,
                                       meta={"transform": name, "category": category, "kind": "attack",
                                             **({"history": history} if history else {})}))
        for (row, name, (history, prompt)), answer in zip(looks, answers[len(attacks):]):
            refused = judge.refused(prompt, answer)
            kind = "plain" if name == "none" else "look_alike"
            key = "plain" if kind == "plain" else "look_alikes"
            stats[key] += 1
            stats[f"{key}_refused"] += int(refused)
            items.append(DreamItem(self.name, row.get("bucket", "benign"), row.get("system") or "", prompt,
                                   chosen=row["response"], rejected=answer if refused else rng.choice(refusals),
                                   source_id=row.get("record_id", ""), generator=defender.identity,
                                   meta={"transform": name, "kind": kind, "defender_refused": refused,
                                         **({"history": history} if history else {})}))
        return items, library, dict(stats)


class Replay:
    name = "replay"

    def __init__(self, max_share: float, max_times_replayed: int):
        if not 0 <= max_share <= 1:
            raise ValueError(f"replay.max_share must be in [0, 1], got {max_share}")
        self.max_share, self.max_times_replayed = max_share, max_times_replayed

    def cap(self, other_items: int) -> int:
        """How many replayed items a dream set of ``other_items`` other items may hold: at most
        ``max_share`` of the whole set."""
        if self.max_share >= 1:
            return 10**9
        return int(self.max_share * other_items / (1 - self.max_share))

    def run(self, pool: list[dict], other_items: int, rng: random.Random) -> tuple[list[DreamItem], dict]:
        """``pool``: the replay table's rows (:func:`sleep_pipeline.data.replay.replay_pool`), least replayed first."""
        eligible = [r for r in pool if int(r.get("times_replayed") or 0) < self.max_times_replayed]
        eligible.sort(key=lambda r: (int(r.get("times_replayed") or 0), r["record_id"]))
        take = eligible[:self.cap(other_items)]
        items = [DreamItem(self.name, r.get("bucket", ""), r.get("system") or "", r["prompt"], chosen=r["response"],
                           rejected=None, source_id=r["record_id"], generator="seed data",
                           meta={"times_replayed": int(r.get("times_replayed") or 0)}) for r in take]
        return items, {"pool": len(pool), "eligible": len(eligible), "cap": self.cap(other_items), "taken": len(items)}
