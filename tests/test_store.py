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
