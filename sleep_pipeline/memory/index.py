"""The retrieval index (short-term memory): quality control on what enters, a BM25 index (``bm25s``),
and what every refresh measures.

Quality control, in order, each rejection recorded with its reason (``retrieval_rejections``):

* ``malformed``: not a JSON object with a text, an id and a parseable ``updated_at``;
* ``from_the_future``: dated after the refresh day;
* ``stale``: older than the freshness window;
* ``low_quality``: below the minimum heuristic quality score (too short or long, few letters, boilerplate);
* ``duplicate``: the same normalised text as an entry already kept (the newest copy is kept);
* ``superseded``: an older statement of a fact (same ``key``) than one already kept.

Measured on every refresh, on held-out questions, and stored (``retrieval_refreshes``):

* ``hit@k``: some statement of the fact (any version) is among the top k -- what "hit rate" usually means;
* ``recall@k``: the *current* statement of the fact is among the top k;
* ``stale@k``: an outdated statement of the fact is among the top k;
* answer accuracy of the live release reading the top-k passages, beside its closed-book accuracy.

The same questions are also run against an index of everything the feeds hold (no quality control), so
the anti-pattern "RAG as a trash bin" -- hits up, answers worse -- shows up as two rows of one table.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sleep_pipeline.recipe_checks import check_keys, fail, get, in_file, mapping, number, read_yaml, section
from sleep_pipeline.store import connect, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS retrieval_refreshes (
    refresh_id VARCHAR PRIMARY KEY, as_of DATE, created_at TIMESTAMP, cycle_id VARCHAR, live_version VARCHAR,
    entries_in INTEGER, accepted INTEGER, rejected INTEGER, rejected_by_reason VARCHAR, questions INTEGER, k INTEGER,
    hit_at_k DOUBLE, recall_at_k DOUBLE, stale_at_k DOUBLE, answer_accuracy DOUBLE, answer_stderr DOUBLE,
    closed_book_accuracy DOUBLE, unfiltered VARCHAR, path VARCHAR, alarm_id VARCHAR
);
CREATE TABLE IF NOT EXISTS retrieval_rejections (
    refresh_id VARCHAR, entry_id VARCHAR, source VARCHAR, reason VARCHAR, detail VARCHAR
);
"""
GENERATORS = ("daily_facts",)
BOILERPLATE = ("lorem ipsum", "todo", "tbd", "n/a", "see ticket", "update pending", "placeholder")
SYSTEM = "Answer the question with the fact it asks for, in a few words."


class MemoryError_(RuntimeError):
    """A knowledge source or the question set cannot be used."""


@dataclass(frozen=True)
class FeedSpec:
    name: str
    path: Path
    generator: str | None = None


@dataclass(frozen=True)
class MemoryRecipe:
    source: str
    sources: tuple[FeedSpec, ...]
    questions_path: Path
    questions_generator: str | None
    questions_count: int
    seed: int
    churn: float
    history_days: int
    freshness_days: float
    min_quality: float
    min_chars: int
    max_chars: int
    k: int
    max_new_tokens: int
    batch_size: int
    alarm_z: float | None


def _path(raw: dict, where: str, base: Path, storage: Path) -> Path:
    p = Path(get(raw, "path", where, str).replace("{storage}", str(storage)))
    return p if p.is_absolute() else (base / p).resolve()


def load_memory_recipe(recipes_dir: str | Path, storage_dir: str | Path) -> MemoryRecipe:
    path = Path(recipes_dir).resolve() / "memory.yaml"
    raw = read_yaml(path)
    storage = Path(storage_dir).resolve()
    with in_file(path):
        check_keys(raw, {"sources", "questions", "generator", "quality", "retrieval", "evaluation"}, "")
        feeds = []
        for i, s in enumerate(get(raw, "sources", "", list)):
            w = f"sources[{i}]"
            mapping(s, w, {"name", "path", "generator"})
            gen = get(s, "generator", w, str, None)
            if gen is not None and gen not in GENERATORS:
                raise fail(f"{w}.generator", f"unknown generator {gen!r} (known: {', '.join(GENERATORS)})")
            feeds.append(FeedSpec(get(s, "name", w, str), _path(s, w, path.parent, storage), gen))
        if not feeds:
            raise fail("sources", "needs at least one knowledge source")
        q = section(raw, "questions", "", {"path", "generator", "count"}, required=True)
        qgen = get(q, "generator", "questions", str, None)
        if qgen is not None and qgen not in GENERATORS:
            raise fail("questions.generator", f"unknown generator {qgen!r} (known: {', '.join(GENERATORS)})")
        g = section(raw, "generator", "", {"seed", "churn", "history_days"})
        qc = section(raw, "quality", "", {"freshness_days", "min_quality", "min_chars", "max_chars"})
        r = section(raw, "retrieval", "", {"k"})
        e = section(raw, "evaluation", "", {"max_new_tokens", "batch_size", "alarm_z"})
        return MemoryRecipe(
            source=str(path), sources=tuple(feeds), questions_path=_path(q, "questions", path.parent, storage),
            questions_generator=qgen, questions_count=number(q, "count", "questions", 48, lo=1, kind=int),
            seed=number(g, "seed", "generator", 0, kind=int), churn=number(g, "churn", "generator", 0.3, lo=0.0, hi=1.0),
            history_days=number(g, "history_days", "generator", 30, lo=1, kind=int),
            freshness_days=number(qc, "freshness_days", "quality", 7.0, lo=0.0),
            min_quality=number(qc, "min_quality", "quality", 0.5, lo=0.0, hi=1.0),
            min_chars=number(qc, "min_chars", "quality", 20, lo=1, kind=int),
            max_chars=number(qc, "max_chars", "quality", 2000, lo=1, kind=int),
            k=number(r, "k", "retrieval", 3, lo=1, hi=100, kind=int),
            max_new_tokens=number(e, "max_new_tokens", "evaluation", 24, lo=1, hi=512, kind=int),
            batch_size=number(e, "batch_size", "evaluation", 16, lo=1, hi=512, kind=int),
            alarm_z=number(e, "alarm_z", "evaluation", 2.0, lo=0.0))


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s.]", " ", text.lower())).strip()


def quality_score(text: str, min_chars: int, max_chars: int) -> tuple[float, str]:
    """A heuristic score in [0, 1] and what lowered it."""
    t = text.strip()
    low = t.lower()
    if any(b in low for b in BOILERPLATE):
        return 0.0, "boilerplate"
    if len(t) < min_chars:
        return 0.2, f"{len(t)} characters < {min_chars}"
    if len(t) > max_chars:
        return 0.3, f"{len(t)} characters > {max_chars}"
    letters = sum(c.isalpha() for c in t) / max(len(t), 1)
    words = len(t.split())
    score = min(1.0, letters / 0.6) * min(1.0, words / 5)
    return round(score, 3), f"letters {letters:.2f}, words {words}"


def _date(value) -> dt.date | None:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).date()
    except ValueError:
        return None


@dataclass
class Screened:
    accepted: list[dict] = field(default_factory=list)
    everything: list[dict] = field(default_factory=list)  # every well-formed entry (the unfiltered index)
    rejected: list[dict] = field(default_factory=list)  # {entry_id, source, reason, detail}
    entries_in: int = 0

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejected:
            out[r["reason"]] = out.get(r["reason"], 0) + 1
        return dict(sorted(out.items()))


def read_feed(spec: FeedSpec) -> list[tuple[int, str]]:
    """(line number, raw line) of a feed; a missing or empty feed is an error that names it."""
    if not spec.path.exists():
        raise MemoryError_(f"knowledge source {spec.name!r}: {spec.path} does not exist")
    lines = []
    with open(spec.path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if raw.strip():
                lines.append((n, raw.decode("utf-8", errors="replace")))
    if not lines:
        raise MemoryError_(f"knowledge source {spec.name!r}: {spec.path} is empty")
    return lines


def screen(recipe: MemoryRecipe, as_of: dt.date) -> Screened:
    """Every entry of every feed, through quality control (see the module docstring)."""
    out = Screened()
    candidates: list[dict] = []
    for spec in recipe.sources:
        for n, line in read_feed(spec):
            out.entries_in += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                out.rejected.append({"entry_id": f"{spec.name}:{n}", "source": spec.name, "reason": "malformed",
                                     "detail": f"line {n}: not JSON ({exc.msg})"})
                continue
            day = _date(row.get("updated_at")) if isinstance(row, dict) else None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row.get("id") or day is None:
                out.rejected.append({"entry_id": str(row.get("id") if isinstance(row, dict) else None) or f"{spec.name}:{n}",
                                     "source": spec.name, "reason": "malformed",
                                     "detail": f"line {n}: needs id, text and an ISO updated_at"})
                continue
            entry = {"id": str(row["id"]), "text": row["text"], "day": day, "key": row.get("key"),
                     "source": row.get("source") or spec.name}
            out.everything.append(entry)
            candidates.append(entry)
    window = dt.timedelta(days=recipe.freshness_days)
    kept_text: dict[str, str] = {}
    kept_key: dict[str, dict] = {}
    # newest first, so a duplicate or an older statement of a fact loses to the one already kept
    for e in sorted(candidates, key=lambda e: (e["day"], e["id"]), reverse=True):
        if e["day"] > as_of:
            reason, detail = "from_the_future", f"updated {e['day']} after the refresh day {as_of}"
        elif as_of - e["day"] > window:
            reason, detail = "stale", f"updated {e['day']}, {(as_of - e['day']).days} days before {as_of} (window {recipe.freshness_days:g})"
        else:
            score, why = quality_score(e["text"], recipe.min_chars, recipe.max_chars)
            norm = normalise(e["text"])
            if score < recipe.min_quality:
                reason, detail = "low_quality", f"score {score} < {recipe.min_quality} ({why})"
            elif norm in kept_text:
                reason, detail = "duplicate", f"same text as {kept_text[norm]}"
            elif e["key"] and e["key"] in kept_key:
                reason, detail = "superseded", f"{e['key']} restated by {kept_key[e['key']]['id']} ({kept_key[e['key']]['day']})"
            else:
                kept_text[norm] = e["id"]
                if e["key"]:
                    kept_key[e["key"]] = e
                out.accepted.append(e)
                continue
        out.rejected.append({"entry_id": e["id"], "source": e["source"], "reason": reason, "detail": detail})
    out.accepted.sort(key=lambda e: e["id"])
    return out


def _tokens(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


class Index:
    """A BM25 index over entries (``bm25s``), saved with its entries so a reader needs only the folder."""

    def __init__(self, entries: list[dict]):
        import bm25s

        if not entries:
            raise MemoryError_("nothing passed quality control: the index would be empty")
        self.entries = entries
        self.bm25 = bm25s.BM25()
        self.bm25.index(_tokens([e["text"] for e in entries]), show_progress=False)

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        k = min(k, len(self.entries))
        ids, _ = self.bm25.retrieve(_tokens(queries), k=k, show_progress=False, n_threads=1)
        return [[self.entries[int(i)] for i in row] for row in ids]

    def save(self, path: Path) -> None:
        self.bm25.save(str(path / "bm25"))
        (path / "entries.jsonl").write_text("".join(json.dumps({**e, "day": e["day"].isoformat()}) + "\n"
                                                    for e in self.entries), encoding="utf-8")


def load_index(path: Path) -> Index:
    import bm25s

    idx = Index.__new__(Index)
    rows = [json.loads(line) for line in (Path(path) / "entries.jsonl").read_text(encoding="utf-8").splitlines()]
    idx.entries = [{**r, "day": dt.date.fromisoformat(r["day"])} for r in rows]
    idx.bm25 = bm25s.BM25.load(str(Path(path) / "bm25"))
    return idx


def mentions(text: str, answer: str) -> bool:
    """Whether ``text`` states ``answer`` as a whole word or number ("20" is not in "2026")."""
    return re.search(rf"(?<![\w.]){re.escape(normalise(answer))}(?![\w]|\.\d)", normalise(text)) is not None


def retrieval_metrics(index: Index, qs: list[dict], k: int) -> tuple[dict, list[list[dict]]]:
    """hit@k (a statement of the fact, any value), recall@k (one stating its current value) and stale@k
    (one stating an outdated value) of ``index`` on questions ``qs``, and the passages found."""
    found = index.search([q["question"] for q in qs], k)
    hit = recall = stale = 0
    for q, passages in zip(qs, found):
        same = [p for p in passages if p.get("key") == q["key"]]
        fresh = [p for p in same if mentions(p["text"], q["answer"])]
        hit += bool(same)
        recall += bool(fresh)
        stale += len(fresh) < len(same)
    n = max(len(qs), 1)
    return {"hit_at_k": hit / n, "recall_at_k": recall / n, "stale_at_k": stale / n}, found


def prompt(question: str, passages: list[dict] | None) -> str:
    if not passages:
        return question
    context = "\n".join(f"[{i + 1}] {p['text']}" for i, p in enumerate(passages))
    return f"Passages:\n{context}\n\nQuestion: {question}"


def correct(answer: str, output: str) -> bool:
    return mentions(output, answer)


def accuracy(outputs: list[str], qs: list[dict]) -> tuple[float, float]:
    """(accuracy, its standard error)."""
    n = max(len(qs), 1)
    p = sum(correct(q["answer"], o) for q, o in zip(qs, outputs)) / n
    return p, math.sqrt(p * (1 - p) / n)


def ensure_inputs(recipe: MemoryRecipe, as_of: dt.date) -> list[dict]:
    """Generate the embedded default's feed and questions for ``as_of`` where the recipe says so, then
    read the questions (each needs question, answer and key)."""
    from sleep_pipeline.memory import facts

    for spec in recipe.sources:
        if spec.generator == "daily_facts":
            facts.write_feed(spec.path, as_of, recipe.seed, recipe.churn, recipe.history_days)
    if recipe.questions_generator == "daily_facts":
        qs = facts.questions(as_of, recipe.questions_count, recipe.seed, recipe.churn, recipe.history_days)
        recipe.questions_path.parent.mkdir(parents=True, exist_ok=True)
        recipe.questions_path.write_text("".join(json.dumps(q) + "\n" for q in qs), encoding="utf-8")
    if not recipe.questions_path.exists():
        raise MemoryError_(f"question set {recipe.questions_path} does not exist")
    qs = []
    for n, line in enumerate(recipe.questions_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MemoryError_(f"{recipe.questions_path}:{n}: not JSON ({exc.msg})") from exc
        if not all(isinstance(q.get(f), str) and q.get(f) for f in ("question", "answer", "key")):
            raise MemoryError_(f"{recipe.questions_path}:{n}: a question needs question, answer and key")
        qs.append(q)
    if not qs:
        raise MemoryError_(f"question set {recipe.questions_path} is empty")
    return qs[: recipe.questions_count]


@dataclass
class Refresh:
    refresh_id: str
    as_of: dt.date
    path: Path
    screened: Screened
    metrics: dict  # {"quality-controlled": {...}, "unfiltered": {...}}
    live_version: str | None
    closed_book: float | None
    alarm: str | None
    previous: dict | None
    seconds: float
    examples: list[dict]


def _previous(db_path: Path) -> dict | None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute("SELECT refresh_id, as_of, live_version, answer_accuracy, answer_stderr, recall_at_k, hit_at_k "
                           "FROM retrieval_refreshes ORDER BY created_at DESC LIMIT 1").fetchall()
    cols = ["refresh_id", "as_of", "live_version", "answer_accuracy", "answer_stderr", "recall_at_k", "hit_at_k"]
    return dict(zip(cols, rows[0])) if rows else None


def history(db_path: Path, limit: int = 14) -> list[dict]:
    cols = ["refresh_id", "as_of", "live_version", "accepted", "rejected", "hit_at_k", "recall_at_k", "stale_at_k",
            "answer_accuracy", "closed_book_accuracy", "alarm_id"]
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute(f"SELECT {', '.join(cols)} FROM retrieval_refreshes ORDER BY created_at DESC LIMIT ?",
                           [limit]).fetchall()
    return [dict(zip(cols, r)) for r in reversed(rows)]


def refresh(db_path: Path, storage_root: Path, recipe: MemoryRecipe, as_of: dt.date, cycle_id: str | None = None,
            log=print) -> Refresh:
    """Screen the feeds, build and publish the index, measure it (and the unfiltered one) on the held-out
    questions with the live release reading the passages, record everything, and raise a regression alarm
    when answer accuracy fell beyond noise against the previous refresh of the same live release."""
    from sleep_pipeline.release import registry

    t0 = time.time()
    qs = ensure_inputs(recipe, as_of)
    screened = screen(recipe, as_of)
    log(f"retrieval index {as_of}: {screened.entries_in} entries in, {len(screened.accepted)} accepted, "
        f"rejected {screened.reasons()}")
    qc_index = Index(screened.accepted)
    raw_index = Index(screened.everything)
    qc_metrics, qc_found = retrieval_metrics(qc_index, qs, recipe.k)
    raw_metrics, raw_found = retrieval_metrics(raw_index, qs, recipe.k)
    live = registry.live(db_path)
    closed = None
    examples = []
    if live is not None:
        from sleep_pipeline.dream.generator import LocalGenerator
        from sleep_pipeline.gate.evaluate import load_for_eval

        model, tok = load_for_eval(Path(live.checkpoint_path))
        gen = LocalGenerator(model, tok, f"release:{live.version}", recipe.batch_size)
        log(f"live release {live.version} answers {len(qs)} questions three ways (closed book, the index, no QC)")
        outs = {name: gen.greedy([(SYSTEM, prompt(q["question"], passages)) for q, passages in zip(qs, found)],
                                 recipe.max_new_tokens)
                for name, found in (("closed", [None] * len(qs)), ("qc", qc_found), ("raw", raw_found))}
        closed = accuracy(outs["closed"], qs)[0]
        qc_metrics["answer_accuracy"], qc_metrics["answer_stderr"] = accuracy(outs["qc"], qs)
        raw_metrics["answer_accuracy"], raw_metrics["answer_stderr"] = accuracy(outs["raw"], qs)
        examples = [{"question": q["question"], "answer": q["answer"], "with_index": o, "closed_book": c}
                    for q, o, c in list(zip(qs, outs["qc"], outs["closed"]))[:5]]
    else:
        log("nothing is live: answer accuracy is not measured (recall is)")
    previous = _previous(db_path)
    refresh_id = f"{as_of.isoformat()}-{uuid.uuid4().hex[:8]}"
    root = Path(storage_root) / "memory"
    stage = root / f".staging-{refresh_id}"
    stage.mkdir(parents=True, exist_ok=True)
    qc_index.save(stage)
    final = root / f"index-{refresh_id}"
    stage.rename(final)
    alarm = None
    acc = qc_metrics.get("answer_accuracy")
    if (recipe.alarm_z is not None and acc is not None and previous and previous["answer_accuracy"] is not None
            and live is not None and previous["live_version"] == live.version):
        se = math.hypot(qc_metrics["answer_stderr"], previous["answer_stderr"] or 0.0)
        drop = previous["answer_accuracy"] - acc
        if drop > recipe.alarm_z * max(se, 1e-9):
            alarm = registry.raise_alarm(
                db_path, live.version, f"retrieval answer accuracy fell {previous['answer_accuracy']:.3f} -> {acc:.3f} "
                f"(z {drop / max(se, 1e-9):.1f}) between refreshes {previous['refresh_id']} and {refresh_id}",
                source="retrieval_index")
            log(f"regression alarm {alarm} raised on {live.version}: answer accuracy fell beyond noise")
    with connect(db_path) as con:
        con.execute(SCHEMA)
        con.execute("INSERT INTO retrieval_refreshes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
            refresh_id, as_of, utcnow(), cycle_id, live.version if live else None, screened.entries_in,
            len(screened.accepted), len(screened.rejected), json.dumps(screened.reasons()), len(qs), recipe.k,
            qc_metrics["hit_at_k"], qc_metrics["recall_at_k"], qc_metrics["stale_at_k"], qc_metrics.get("answer_accuracy"),
            qc_metrics.get("answer_stderr"), closed, json.dumps(raw_metrics), str(final), alarm])
        if screened.rejected:
            con.executemany("INSERT INTO retrieval_rejections VALUES (?, ?, ?, ?, ?)",
                            [[refresh_id, r["entry_id"], r["source"], r["reason"], r["detail"][:500]]
                             for r in screened.rejected])
    return Refresh(refresh_id, as_of, final, screened, {"quality-controlled": qc_metrics, "unfiltered": raw_metrics},
                   live.version if live else None, closed, alarm, previous, time.time() - t0, examples)


def current_index(db_path: Path) -> Path | None:
    """The folder of the latest refresh's index."""
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute("SELECT path FROM retrieval_refreshes ORDER BY created_at DESC LIMIT 1").fetchall()
    return Path(rows[0][0]) if rows else None


def prune(storage_root: Path, db_path: Path, keep: int = 3) -> None:
    """Delete index folders beyond the newest ``keep`` (their refresh rows and figures stay)."""
    with connect(db_path) as con:
        con.execute(SCHEMA)
        keep_paths = {r[0] for r in con.execute("SELECT path FROM retrieval_refreshes ORDER BY created_at DESC LIMIT ?",
                                                [keep]).fetchall()}
    for d in (Path(storage_root) / "memory").glob("index-*"):
        if str(d) not in keep_paths:
            shutil.rmtree(d, ignore_errors=True)
