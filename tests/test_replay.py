"""The hard-example replay table: stratified feeding, capped and least-replayed-first drawing, counting."""

import json

import pytest

from sleep_pipeline.config import DataRecipe, DedupConfig, MixConfig, QualityConfig
from sleep_pipeline.data.mix import REPLAY_TABLE as MIX_REPLAY_TABLE
from sleep_pipeline.data.mix import materialize_mix
from sleep_pipeline.data.replay import (REPLAY_TABLE, draw, ensure_schema, feed, mark_replayed, replay_pool,
                                        select_hard_examples)
from sleep_pipeline.store import connect, query_dicts
from sleep_pipeline.store import ensure_schema as ensure_store_schema

CAPABILITY = ("basic_recognition", "reasoning", "planning", "tool_use", "structured_output")


def _failing(bucket: str, n: int, start: int = 0) -> list[dict]:
    return [{"example_id": f"{bucket}-{i}", "bucket": bucket, "system": "", "prompt": f"{bucket} q{i}",
             "response": f"a{i}", "meta": json.dumps({"suite": f"sp_{bucket}"})} for i in range(start, start + n)]


def _per_bucket(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["bucket"]] = out.get(r["bucket"], 0) + 1
    return out


# ------------------------------------------------------------------------------------- selection
def test_capability_failures_listed_first_do_not_crowd_out_safety():
    failing = [r for b in CAPABILITY for r in _failing(b, 60)] + _failing("safety", 40)  # 300 + 40
    picked = select_hard_examples(failing, max_items=100, per_bucket_cap=100)
    counts = _per_bucket(picked)
    assert len(picked) == 100
    assert counts["safety"] >= 100 // 6  # its turn in every round: 16 or 17 of 100, not 0 as in suite order
    assert max(counts.values()) - min(counts.values()) <= 1

    # all 300 capability failures in one bucket: the per-bucket cap leaves room for every safety failure
    failing = _failing("reasoning", 300) + _failing("safety", 40)
    counts = _per_bucket(select_hard_examples(failing, max_items=100, per_bucket_cap=50))
    assert counts == {"reasoning": 50, "safety": 40}


def test_selection_caps_per_bucket_and_overall_and_is_deterministic():
    failing = _failing("planning", 10) + _failing("reasoning", 10) + _failing("tool_use", 10)
    assert _per_bucket(select_hard_examples(failing, 100, 4)) == {"planning": 4, "reasoning": 4, "tool_use": 4}
    # overall cap mid-round: buckets take their turns in name order
    assert _per_bucket(select_hard_examples(failing, 5, 4)) == {"planning": 2, "reasoning": 2, "tool_use": 1}
    a = select_hard_examples(failing, 7, 3)
    assert a == select_hard_examples(failing, 7, 3)
    # the items kept are the first of their bucket, returned in the order given
    assert [r["example_id"] for r in a] == ["planning-0", "planning-1", "planning-2", "reasoning-0", "reasoning-1",
                                            "tool_use-0", "tool_use-1"]
    assert select_hard_examples(failing, 0, 4) == []
    # an example listed twice counts once
    assert len(select_hard_examples(failing + failing, 100, 100)) == 30
    with pytest.raises(ValueError, match="max_items"):
        select_hard_examples(failing, -1, 4)
    with pytest.raises(ValueError, match="lacks prompt"):
        select_hard_examples([{"example_id": "x", "bucket": "reasoning", "system": "", "response": "a", "meta": "{}"}], 5, 5)


def test_feed_adds_each_example_once_and_spends_its_quota_on_new_ones(tmp_path):
    db = tmp_path / "sleep.duckdb"
    added = feed(db, "gate-1", _failing("reasoning", 30) + _failing("safety", 5), max_items=20, per_bucket_cap=15)
    assert added == {"reasoning": 15, "safety": 5}
    assert feed(db, "gate-2", _failing("reasoning", 15) + _failing("safety", 5), 20, 15) == {}
    # the 15 reasoning items already there do not use up the quota: the next 10 new ones go in
    assert feed(db, "gate-3", _failing("reasoning", 25), 10, 10) == {"reasoning": 10}
    with connect(db) as con:
        rows = query_dicts(con, f"SELECT example_id, report_id, times_replayed, last_replayed_in, meta FROM {REPLAY_TABLE}")
    assert len(rows) == len({r["example_id"] for r in rows}) == 30
    assert {r["times_replayed"] for r in rows} == {0} and {r["last_replayed_in"] for r in rows} == {None}
    assert json.loads(rows[0]["meta"])["suite"].startswith("sp_")
    assert MIX_REPLAY_TABLE == REPLAY_TABLE  # the mix re-exports the table name


def test_a_table_of_the_previous_version_is_migrated(tmp_path):
    db = tmp_path / "sleep.duckdb"
    with connect(db) as con:
        con.execute(f"CREATE TABLE {REPLAY_TABLE} (example_id VARCHAR, bucket VARCHAR, system VARCHAR, prompt VARCHAR, "
                    "response VARCHAR, meta VARCHAR, report_id VARCHAR, added_at TIMESTAMP)")
        con.execute(f"INSERT INTO {REPLAY_TABLE} VALUES ('old-1', 'safety', NULL, 'p', 'r', NULL, 'gate-0', now())")
    assert feed(db, "gate-1", _failing("safety", 2), 10, 10) == {"safety": 2}
    with connect(db) as con:
        ensure_schema(con)  # twice is harmless
        pool = replay_pool(con)
        # a writer that still names only the old columns gets the defaults
        con.execute(f"INSERT INTO {REPLAY_TABLE} (example_id, bucket, prompt, response) VALUES ('old-2', 'safety', 'p', 'r')")
        assert mark_replayed(con, "dv-x", ["old-1", "old-2"]) == 2
        after = {r["record_id"]: r for r in replay_pool(con)}
    assert [r["record_id"] for r in pool] == ["old-1", "safety-0", "safety-1"]
    assert {r["times_replayed"] for r in pool} == {0}
    assert pool[0]["system"] == "" and pool[0]["meta"] == "{}" and pool[0]["source"] == "replay"
    assert after["old-1"]["times_replayed"] == after["old-2"]["times_replayed"] == 1
    assert after["old-1"]["last_replayed_in"] == "dv-x"


def test_mark_replayed_counts_a_version_once():
    import duckdb

    con = duckdb.connect()
    ensure_schema(con)
    con.execute(f"INSERT INTO {REPLAY_TABLE} (example_id, bucket, prompt, response) VALUES ('a', 'safety', 'p', 'r')")
    assert mark_replayed(con, "dv-1", ["a"]) == 1
    assert mark_replayed(con, "dv-1", ["a"]) == 0  # the same version again
    assert mark_replayed(con, "dv-2", ["a", "a"]) == 1
    assert mark_replayed(con, "dv-3", []) == 0
    assert query_dicts(con, f"SELECT times_replayed, last_replayed_in FROM {REPLAY_TABLE}") == [
        {"times_replayed": 2, "last_replayed_in": "dv-2"}]


def test_draw_prefers_rows_replayed_fewer_times_then_a_seeded_order():
    pool = [{"record_id": f"r{i}", "bucket": "reasoning", "times_replayed": i % 3} for i in range(30)]
    taken = draw(pool, 10, {"reasoning": 10}, seed=1)
    assert [r["times_replayed"] for r in taken] == [0] * 10
    assert draw(list(reversed(pool)), 10, {"reasoning": 10}, seed=1) == taken
    five = lambda seed: {r["record_id"] for r in draw(pool, 5, {"reasoning": 10}, seed=seed)}  # noqa: E731
    assert five(1) != five(2) and five(1) == {r["record_id"] for r in taken[:5]}
    taken = draw(pool, 15, {"reasoning": 15}, seed=1)
    assert sorted(r["times_replayed"] for r in taken) == [0] * 10 + [1] * 5
    # buckets without a cap (not in the mix) give nothing
    assert draw(pool, 10, {"safety": 10}, seed=1) == []


# ------------------------------------------------------------------------------ mix + counting
def _storage_with_corpus(tmp_path):
    db = tmp_path / "sleep.duckdb"
    with connect(db) as con:
        ensure_store_schema(con)
        for bucket in ("reasoning", "safety"):
            con.execute(f"INSERT INTO deduped_corpus SELECT '{bucket}-' || range, 's', 1, range, '{bucket}', '', "
                        f"'{bucket} q' || range, 'a', '{{}}', '{bucket}-c' || range, '', 'cv1' FROM range(400)")
    return db


def _recipe(seed: int) -> DataRecipe:
    mix = MixConfig(seed=seed, bucket_ratios={"reasoning": 0.5, "safety": 0.5}, tier_weights={1: 1.0},
                    split_ratios={"train": 0.8, "validation": 0.1, "test": 0.1}, total_examples=200,
                    replay_ratio=0.1, replay_cap=20, replay_per_bucket_cap=10)
    return DataRecipe(sources=(), quality=QualityConfig(), dedup=DedupConfig(), mix=mix)


def _times(db) -> dict[str, tuple[int, str | None]]:
    with connect(db) as con:
        return {r["example_id"]: (r["times_replayed"], r["last_replayed_in"])
                for r in query_dicts(con, f"SELECT example_id, times_replayed, last_replayed_in FROM {REPLAY_TABLE}")}


def test_the_mix_counts_what_it_replays_prefers_the_least_replayed_and_is_idempotent(tmp_path):
    db = _storage_with_corpus(tmp_path)
    feed(db, "gate-1", _failing("safety", 20) + _failing("reasoning", 20), max_items=100, per_bucket_cap=100)

    first = materialize_mix(_recipe(1), db, tmp_path / "mixes")
    assert first["replay"]["taken_per_bucket"] == {"reasoning": 10, "safety": 10}
    assert first["counts"]["replay_per_bucket"] == {"reasoning": 10, "safety": 10}
    assert first["counts"]["per_bucket"] == {"reasoning": 100, "safety": 100}  # replay counts toward its bucket
    assert first["replay"]["times_replayed_taken"] == {"0": 20}
    times = _times(db)
    taken_first = {k for k, (t, v) in times.items() if t == 1}
    assert len(taken_first) == 20 and all(v == first["version_id"] for k, (t, v) in times.items() if t == 1)

    # materialised again with the same inputs: the same version, the same rows, nothing counted twice
    again = materialize_mix(_recipe(1), db, tmp_path / "mixes")
    assert again["version_id"] == first["version_id"]
    assert again["parent_version"] == first["parent_version"]
    assert again["counts"] == first["counts"]
    assert _times(db) == times
    with connect(db) as con:
        mixed = query_dicts(con, "SELECT record_id FROM data_mix WHERE version_id = ? AND origin = 'replay'",
                            [first["version_id"]])
    assert {r["record_id"] for r in mixed} == taken_first

    # a new version takes the rows not replayed yet, then (all replayed once) the least replayed again
    second = materialize_mix(_recipe(2), db, tmp_path / "mixes")
    assert second["version_id"] != first["version_id"] and second["parent_version"] == first["version_id"]
    assert second["replay"]["times_replayed_taken"] == {"0": 20}
    assert second["replay"]["times_replayed_pool"] == {"0": 20, "1": 20}
    assert {k for k, (t, _) in _times(db).items() if t == 1} == set(times)  # all 40 once
    third = materialize_mix(_recipe(3), db, tmp_path / "mixes")
    assert third["replay"]["times_replayed_taken"] == {"1": 20}
    assert sorted(t for t, _ in _times(db).values()) == [1] * 20 + [2] * 20
