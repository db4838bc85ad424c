"""The embedded default's high-churn knowledge: operational facts that change from day to day.

A small world of services and products whose on-call engineer, status, deployed version and price
change on seeded days. :func:`write_feed` writes the feed a knowledge base would receive up to a day
``as_of`` -- a dated snapshot of every fact each day, plus what real feeds carry too: mirrored duplicates,
stub and boilerplate entries, and history older than any freshness window (an older snapshot states
the value a fact had then, which is wrong today once the fact has changed). :func:`questions` asks about the
facts as they stand on ``as_of``, in wordings no entry (and no training data) uses, each with its answer
and the key of the fact it needs. Everything is a function of the seed and the day: no network, and the
same day gives the same feed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from pathlib import Path

SERVICES = ["billing", "search", "checkout", "login", "payments", "notifications", "inventory", "shipping",
            "reporting", "messaging", "recommendations", "profile"]
PRODUCTS = ["red kettle", "desk lamp", "travel mug", "wool scarf", "garden hose", "yoga mat", "phone stand",
            "water bottle", "camping stove", "rain jacket"]
PEOPLE = ["Priya Nair", "Tomas Weber", "Aiko Tanaka", "Maya Cohen", "Luis Ortega", "Grace Okafor", "Ivan Petrov",
          "Sara Lindqvist", "Omar Haddad", "Chen Wei", "Nina Rossi", "David Mensah"]
STATUSES = ["operational", "degraded", "under maintenance", "recovering"]

# attribute -> (entry template, question templates); a question never reuses an entry's wording
ATTRIBUTES = {
    "on_call": ("As of {day}, the on-call engineer for the {e} service is {v}.",
                ["Who should I page about a {e} outage right now?", "Which person is currently on call for {e}?"]),
    "status": ("Status update {day}: the {e} service is {v}.",
               ["What state is {e} in at the moment?", "Is {e} healthy right now? Name its current state."]),
    "version": ("Deployment log {day}: {e} now runs release {v}.",
                ["Which release of {e} is deployed today?", "What version number is {e} currently on?"]),
    "price": ("Price list {day}: the {e} sells for {v} dollars.",
              ["How much would the {e} cost me today, in dollars?", "What is the current dollar price of a {e}?"]),
}
FACTS = [(s, a) for s in SERVICES for a in ("on_call", "status", "version")] + [(p, "price") for p in PRODUCTS]
JUNK = ["TODO: fill in", "lorem ipsum dolor sit amet", "N/A", "see ticket", "########", "update pending......"]


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def _value(entity: str, attr: str, epoch: int, seed: int) -> str:
    h = _h(seed, entity, attr, epoch)
    if attr == "on_call":
        return PEOPLE[h % len(PEOPLE)]
    if attr == "status":
        return STATUSES[h % len(STATUSES)]
    if attr == "version":
        return f"{2 + h % 3}.{h % 17}.{h % 9}"
    return str(10 + h % 190)


def _changes(entity: str, attr: str, day: dt.date, seed: int, churn: float) -> bool:
    return _h(seed, "change", entity, attr, day.isoformat()) % 10_000 < churn * 10_000


def fact_key(entity: str, attr: str) -> str:
    return f"{attr}:{entity}"


def value_on(entity: str, attr: str, day: dt.date, seed: int, churn: float, origin: dt.date) -> tuple[str, dt.date]:
    """The fact's value on ``day`` and the day it last changed (facts exist from ``origin`` on)."""
    d = day
    while d > origin and not _changes(entity, attr, d, seed, churn):
        d -= dt.timedelta(days=1)
    return _value(entity, attr, d.toordinal(), seed), d


def feed_entries(as_of: dt.date, seed: int = 0, churn: float = 0.3, history_days: int = 30) -> list[dict]:
    """Every entry the feed holds on ``as_of``: each day of ``history_days``, a dated statement of every
    fact's value that day, plus mirrored duplicates and junk, in arrival order."""
    origin = as_of - dt.timedelta(days=history_days)
    rng = random.Random(_h(seed, "feed", as_of.isoformat()))
    out: list[dict] = []
    for day_n in range(history_days + 1):
        day = origin + dt.timedelta(days=day_n)
        for entity, attr in FACTS:
            value, _ = value_on(entity, attr, day, seed, churn, origin)
            text = ATTRIBUTES[attr][0].format(day=day.isoformat(), e=entity, v=value)
            entry = {"id": f"{attr}-{entity.replace(' ', '_')}-{day.isoformat()}", "text": text,
                     "updated_at": day.isoformat(), "key": fact_key(entity, attr), "source": "ops_feed"}
            out.append(entry)
            if rng.random() < 0.05:  # a mirror re-posts the same entry under another id
                out.append({**entry, "id": entry["id"] + "-mirror", "source": "ops_mirror"})
        if rng.random() < 0.5:
            out.append({"id": f"junk-{day.isoformat()}-{rng.randrange(10**6)}", "text": rng.choice(JUNK),
                        "updated_at": day.isoformat(), "source": "ops_feed"})
    return out


def write_feed(path: Path, as_of: dt.date, seed: int = 0, churn: float = 0.3, history_days: int = 30) -> int:
    """Write the feed as it stands on ``as_of`` (atomically); returns the number of entries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = feed_entries(as_of, seed, churn, history_days)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return len(rows)


def questions(as_of: dt.date, n: int, seed: int = 0, churn: float = 0.3, history_days: int = 30) -> list[dict]:
    """``n`` held-out questions about the facts as they stand on ``as_of``, with answers and fact keys."""
    origin = as_of - dt.timedelta(days=history_days)
    rng = random.Random(_h(seed, "questions", as_of.isoformat()))
    facts = rng.sample(FACTS, min(n, len(FACTS)))
    while len(facts) < n:
        facts.append(rng.choice(FACTS))
    out = []
    for i, (entity, attr) in enumerate(facts):
        value, since = value_on(entity, attr, as_of, seed, churn, origin)
        template = rng.choice(ATTRIBUTES[attr][1])
        out.append({"id": f"q{i:03d}-{attr}-{entity.replace(' ', '_')}", "question": template.format(e=entity),
                    "answer": value, "key": fact_key(entity, attr), "since": since.isoformat()})
    return out
