"""The retrieval index: quality control records every rejection with its reason, the held-out questions
use wordings no entry uses, retrieval is measured three ways (hit, current, stale), the unscreened index
shows "hits up, answers worse", and a fall in answer accuracy beyond noise raises a regression alarm."""

import datetime as dt
import json

import pytest
import yaml

from sleep_pipeline.memory import facts
from sleep_pipeline.memory import index as memory
from sleep_pipeline.release import registry
from sleep_pipeline.store import connect
from tests.test_release_registry import make_checkpoint

DAY = dt.date(2026, 12, 12)


def _recipe(recipes_dir, storage, **quality):
    raw = yaml.safe_load((recipes_dir / "memory.yaml").read_text())
    raw["quality"].update(quality)
    (recipes_dir / "memory.yaml").write_text(yaml.safe_dump(raw))
    return memory.load_memory_recipe(recipes_dir, storage)


def test_quality_control_records_every_rejection_with_its_reason(recipes_dir, tmp_path):
    recipe = _recipe(recipes_dir, tmp_path)
    feed = recipe.sources[0].path
    feed.parent.mkdir(parents=True)
    good = {"id": "a", "text": "As of 2026-12-11, the on-call engineer for billing is Maya Cohen.",
            "updated_at": "2026-12-11", "key": "on_call:billing"}
    rows = [
        good,
        {**good, "id": "a-old", "text": "As of 2026-12-09, the on-call engineer for billing is Ivan Petrov.",
         "updated_at": "2026-12-09"},                                                     # superseded by a
        {**good, "id": "a-copy", "updated_at": "2026-12-10"},                              # duplicate of a
        {"id": "b", "text": "Status update: the search service is operational today.", "updated_at": "2026-11-01"},  # stale
        {"id": "c", "text": "Deployment log: login now runs release 3.1.4 everywhere.", "updated_at": "2026-12-20"},  # future
        {"id": "d", "text": "TODO: fill in the price list for tomorrow", "updated_at": "2026-12-12"},  # boilerplate
        {"id": "e", "text": "#### !!!! ####", "updated_at": "2026-12-12"},                 # short, no letters
        {"id": "f", "text": "an entry without a date"},                                     # malformed
    ]
    feed.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n\n", encoding="utf-8")
    out = memory.screen(recipe, DAY)
    assert [e["id"] for e in out.accepted] == ["a"]
    assert out.entries_in == 9 and len(out.accepted) + len(out.rejected) == out.entries_in  # nothing silently lost
    why = {r["entry_id"]: r["reason"] for r in out.rejected}
    assert why == {"a-old": "superseded", "a-copy": "duplicate", "b": "stale", "c": "from_the_future",
                   "d": "low_quality", "e": "low_quality", "f": "malformed", "ops_feed:9": "malformed"}
    detail = {r["entry_id"]: r["detail"] for r in out.rejected}
    assert "restated by a" in detail["a-old"] and "41 days before" in detail["b"] and "line 9" in detail["ops_feed:9"]
    feed.write_text("")
    with pytest.raises(memory.MemoryError_, match="ops_feed.*is empty"):
        memory.screen(recipe, DAY)


def test_questions_are_worded_unlike_any_entry_and_ask_for_the_current_value():
    entries = facts.feed_entries(DAY)
    qs = facts.questions(DAY, 30)
    texts = [e["text"].lower() for e in entries]
    for q in qs:
        words = q["question"].lower().rstrip("?").split()
        # no five-word run of a question appears in any entry
        assert not any(" ".join(words[i:i + 5]) in t for i in range(len(words) - 4) for t in texts), q
        today = [e for e in entries if e.get("key") == q["key"] and e["updated_at"] == DAY.isoformat()]
        assert today and all(memory.mentions(e["text"], q["answer"]) for e in today)
    # the facts really churn: some answers differ from a week earlier
    week_ago = {q["key"]: q["answer"] for q in facts.questions(DAY, 46)}
    before = {k: facts.value_on(k.split(":")[1], k.split(":")[0], DAY - dt.timedelta(days=7), 0, 0.3,
                                DAY - dt.timedelta(days=30))[0] for k in week_ago}
    assert 0 < sum(week_ago[k] != before[k] for k in week_ago) < len(week_ago)
    assert not memory.mentions("Price list 2026-12-12", "20") and memory.mentions("sells for 20 dollars", "20")


def test_the_screened_index_finds_current_facts_and_the_unscreened_one_finds_stale_ones(recipes_dir, tmp_path):
    recipe = _recipe(recipes_dir, tmp_path)
    qs = memory.ensure_inputs(recipe, DAY)
    out = memory.screen(recipe, DAY)
    screened, _ = memory.retrieval_metrics(memory.Index(out.accepted), qs, recipe.k)
    everything, _ = memory.retrieval_metrics(memory.Index(out.everything), qs, recipe.k)
    assert screened["recall_at_k"] >= 0.9 and screened["stale_at_k"] == 0
    assert everything["stale_at_k"] > 0.3 and everything["recall_at_k"] < screened["recall_at_k"]


class EchoTopPassage:
    """A stand-in reader (the model is not the subject): answers with the passages it is given."""

    def __init__(self, *args, **kwargs):
        pass

    def greedy(self, requests, max_new_tokens):
        return [p.split("Question:")[0] if p.startswith("Passages:") else "I do not know" for _, p in requests]


def test_a_refresh_records_its_figures_and_raises_an_alarm_when_answers_get_worse(recipes_dir, tmp_path, monkeypatch):
    import sleep_pipeline.dream.generator as generator
    import sleep_pipeline.gate.evaluate as evaluate

    monkeypatch.setattr(generator, "LocalGenerator", EchoTopPassage)
    monkeypatch.setattr(evaluate, "load_for_eval", lambda path: (None, None))
    db = tmp_path / "sleep.duckdb"
    recipe = _recipe(recipes_dir, tmp_path)
    first = memory.refresh(db, tmp_path, recipe, DAY, log=lambda m: None)
    assert first.live_version is None and "answer_accuracy" not in first.metrics["quality-controlled"]
    live = registry.release(db, make_checkpoint(tmp_path / "ck", "live")[0], "d", "g")
    second = memory.refresh(db, tmp_path, recipe, DAY, log=lambda m: None)
    qc = second.metrics["quality-controlled"]
    assert qc["answer_accuracy"] >= 0.9 and second.closed_book == 0 and second.alarm is None
    assert second.metrics["unfiltered"]["answer_accuracy"] < qc["answer_accuracy"]
    # a feed gone bad (quality control switched off: every stale snapshot enters): answers get worse
    loose = _recipe(recipes_dir, tmp_path, freshness_days=365, min_quality=0.0)
    loose_feed = [dict(e, key=None) for e in facts.feed_entries(DAY)]  # no keys: nothing is superseded
    monkeypatch.setattr(memory, "screen", lambda r, d: memory.Screened(accepted=loose_feed, everything=loose_feed,
                                                                         entries_in=len(loose_feed)))
    for e in loose_feed:
        e["day"] = dt.date.fromisoformat(e["updated_at"])
    third = memory.refresh(db, tmp_path, loose, DAY, log=lambda m: None)
    assert third.metrics["quality-controlled"]["answer_accuracy"] < qc["answer_accuracy"]
    assert third.alarm is not None
    alarms = registry.open_alarms(db, live.version)
    assert [a["alarm_id"] for a in alarms] == [third.alarm] and alarms[0]["source"] == "retrieval_index"
    with connect(db) as con:
        rows = con.execute("SELECT live_version, alarm_id FROM retrieval_refreshes ORDER BY created_at").fetchall()
        reasons = dict(con.execute("SELECT reason, count(*) FROM retrieval_rejections WHERE refresh_id = ? GROUP BY ALL",
                                   [first.refresh_id]).fetchall())
    assert rows == [(None, None), (live.version, None), (live.version, third.alarm)]
    assert reasons["stale"] > 0 and reasons["superseded"] > 0
    assert memory.current_index(db) == third.path and third.path.is_dir()
    assert memory.load_index(third.path).search(["Who is on call for billing?"], 2)
