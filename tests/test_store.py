"""DuckDB's one-process file lock: writers in several processes wait their turn, nothing is lost."""

import multiprocessing as mp
import time

import duckdb
import pytest

from sleep_pipeline.config import load_data_recipe
from sleep_pipeline.data.corpus import ingest_source
from sleep_pipeline.store import DatabaseBusyError, connect

CTX = mp.get_context("spawn")


def _hold(path, seconds, ready):
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    ready.set()
    time.sleep(seconds)
    con.close()


def _start_holder(db, seconds):
    """Another process that holds the database file open for ``seconds``."""
    ready = CTX.Event()
    holder = CTX.Process(target=_hold, args=(db, seconds, ready))
    holder.start()
    assert ready.wait(30)
    return holder


def test_second_process_waits_for_the_lock_then_writes(tmp_path):
    db = tmp_path / "x.duckdb"
    holder = _start_holder(db, 2.0)
    with pytest.raises(duckdb.IOException, match="lock"):  # the raw failure we guard against
        duckdb.connect(str(db))
    start = time.monotonic()
    with connect(db) as con:
        con.execute("INSERT INTO t VALUES (1)")
    waited = time.monotonic() - start
    holder.join()
    assert waited > 0.5
    with connect(db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 1


def test_gives_up_with_a_clear_error(tmp_path):
    db = tmp_path / "x.duckdb"
    holder = _start_holder(db, 3.0)
    with pytest.raises(DatabaseBusyError, match="stayed locked"):
        with connect(db, wait_s=0.5):
            pass
    holder.join()


def _ingest(recipes_dir, storage, name, barrier):
    recipe = load_data_recipe(recipes_dir, storage)
    barrier.wait()
    ingest_source(recipe.source(name), recipe, storage / "sleep.duckdb", f"proc-{name}")


def test_all_sources_ingest_at_once_into_one_file(recipes_dir, storage):
    names = [s.name for s in load_data_recipe(recipes_dir, storage).sources]
    barrier = CTX.Barrier(len(names))
    procs = [CTX.Process(target=_ingest, args=(recipes_dir, storage, n, barrier)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0] * len(names)
    with connect(storage / "sleep.duckdb", read_only=True) as con:
        got = dict(con.execute("SELECT source, count(*) FROM raw_records GROUP BY source").fetchall())
        ingests = dict(con.execute("SELECT source, records_ok FROM source_ingests").fetchall())
    assert set(got) == set(names)
    assert got == ingests


def test_a_mix_built_on_a_storage_with_replay_rows_does_not_trip_over_an_open_result(tmp_path):
    """A second cycle on one storage: the replay table exists, and reading it after the existence check
    used to fail with DuckDB's "connection has an unfinished result from execute()"."""
    from sleep_pipeline.config import DataRecipe, DedupConfig, MixConfig, QualityConfig
    from sleep_pipeline.data.mix import REPLAY_TABLE, materialize_mix
    from sleep_pipeline.store import ensure_schema

    db = tmp_path / "sleep.duckdb"
    with connect(db) as con:
        ensure_schema(con)
        con.execute("INSERT INTO deduped_corpus SELECT 'r' || range, 's', 1, range, 'reasoning', '', 'q' || range, "
                    "'a', '{}', 'c' || range, '', 'cv1' FROM range(400)")
        con.execute(f"CREATE TABLE {REPLAY_TABLE} (example_id VARCHAR, bucket VARCHAR, system VARCHAR, prompt VARCHAR, "
                    "response VARCHAR, meta VARCHAR, report_id VARCHAR, added_at TIMESTAMP)")
        con.execute(f"INSERT INTO {REPLAY_TABLE} SELECT 'e' || range, 'reasoning', NULL, 'hard ' || range, 'a', NULL, "
                    "'gate-1', now() FROM range(30)")

    mix = MixConfig(seed=1, bucket_ratios={"reasoning": 1.0}, tier_weights={1: 1.0},
                    split_ratios={"train": 0.8, "validation": 0.1, "test": 0.1}, replay_ratio=0.05, replay_cap=10)
    recipe = DataRecipe(sources=(), quality=QualityConfig(), dedup=DedupConfig(), mix=mix)
    manifest = materialize_mix(recipe, db, tmp_path / "mixes")
    assert manifest["counts"]["per_origin"].get("replay", 0) > 0


def test_a_file_another_process_is_still_creating_is_waited_for(tmp_path):
    """Several processes opening a new database at once: one has created the file but not yet written its
    header when another opens it. The second waits instead of failing with "not a valid DuckDB file"."""
    import threading

    db = tmp_path / "new.duckdb"
    db.write_bytes(b"")  # created, header not written yet

    def finish_creating():
        time.sleep(0.4)
        db.unlink()
        duckdb.connect(str(db)).close()

    t = threading.Thread(target=finish_creating)
    t.start()
    with connect(db, wait_s=10) as con:
        assert con.execute("SELECT 1").fetchone()[0] == 1
    t.join()
    full = tmp_path / "corrupt.duckdb"
    full.write_bytes(b"\0" * 3 * 4096)  # as long as a header and still invalid: an error at once
    with pytest.raises(duckdb.IOException, match="not a valid DuckDB"):
        with connect(full, wait_s=10):
            pass
