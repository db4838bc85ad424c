"""The hard-example replay table: what a failed gate feeds, and what the next data mix draws from.

A rejected candidate's failing items (prompt + reference answer, with their task bucket) go to
``hard_example_replay``. Both ends are stratified across buckets: :func:`feed` takes failing items
in turns bucket by bucket (so the capability suites, listed first, cannot fill the whole quota and
crowd out safety failures), and the mix draws with :func:`draw` the same way, capped per bucket and
in all, preferring the rows replayed the fewest times. Every row counts how many data versions took
it (``times_replayed``) and the last one that did (``last_replayed_in``); :func:`mark_replayed`
counts a version once per row, so writing the same version again changes nothing.

Connections are short-lived (:func:`sleep_pipeline.store.connect`) and every result is fully
fetched: DuckDB 2 keeps a partly read result open, and the connection's next query then fails.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterable

import duckdb

from sleep_pipeline.store import connect, insert_rows, query_dicts, utcnow

REPLAY_TABLE = "hard_example_replay"
FAILING_KEYS = ("example_id", "bucket", "system", "prompt", "response", "meta")
REPLAY_COLUMNS = FAILING_KEYS + ("report_id", "added_at", "times_replayed", "last_replayed_in")

_CREATE = f"""
CREATE TABLE IF NOT EXISTS {REPLAY_TABLE} (
    example_id VARCHAR, bucket VARCHAR, system VARCHAR, prompt VARCHAR, response VARCHAR, meta VARCHAR,
    report_id VARCHAR, added_at TIMESTAMP, times_replayed INTEGER DEFAULT 0, last_replayed_in VARCHAR
)"""
# A table written by an earlier version lacks the replay bookkeeping; existing rows start at 0.
_MIGRATIONS = (
    f"ALTER TABLE {REPLAY_TABLE} ADD COLUMN IF NOT EXISTS times_replayed INTEGER DEFAULT 0",
    f"ALTER TABLE {REPLAY_TABLE} ADD COLUMN IF NOT EXISTS last_replayed_in VARCHAR",
)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the replay table, or add the columns an older one lacks."""
    con.execute(_CREATE)
    for statement in _MIGRATIONS:
        con.execute(statement)


def round_robin(by_bucket: dict[str, list[dict]], limit: int, per_bucket: dict[str, int]) -> list[dict]:
    """Rows taken in turns, one per bucket per round (buckets in name order, each list in its own
    order): at most ``per_bucket[b]`` from bucket ``b`` (absent: none) and ``limit`` in all."""
    queues = [rows[: max(per_bucket.get(b, 0), 0)] for b, rows in sorted(by_bucket.items())]
    out: list[dict] = []
    depth = 0
    while len(out) < limit and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(out) < limit:
                out.append(q[depth])
        depth += 1
    return out


def _check_limits(max_items: int, per_bucket_cap: int) -> None:
    if max_items < 0 or per_bucket_cap < 0:
        raise ValueError(f"replay limits must be >= 0, got max_items={max_items}, per_bucket_cap={per_bucket_cap}")


def _unique_failing(failing: list[dict]) -> list[dict]:
    """The failing items, each example_id once (first occurrence), checked for the fields the table needs."""
    out, seen = [], set()
    for row in failing:
        missing = [k for k in FAILING_KEYS if k not in row]
        if missing:
            raise ValueError(f"failing item {row.get('example_id')!r} lacks {', '.join(missing)}")
        if row["example_id"] not in seen:
            seen.add(row["example_id"])
            out.append(row)
    return out


def select_hard_examples(failing: list[dict], max_items: int, per_bucket_cap: int) -> list[dict]:
    """The failing items to replay: taken in turns across buckets (name order; within a bucket in the
    order given), at most ``per_bucket_cap`` per bucket and ``max_items`` in all; deterministic, and
    returned in the order given. Each item: example_id, bucket, system, prompt, response, meta (JSON)."""
    _check_limits(max_items, per_bucket_cap)
    unique = _unique_failing(failing)
    by_bucket: dict[str, list[dict]] = {}
    for row in unique:
        by_bucket.setdefault(row["bucket"], []).append(row)
    chosen = {r["example_id"] for r in round_robin(by_bucket, max_items, dict.fromkeys(by_bucket, per_bucket_cap))}
    return [r for r in unique if r["example_id"] in chosen]


def count_by(rows: Iterable[dict], key: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[str(r[key])] = out.get(str(r[key]), 0) + 1
    return dict(sorted(out.items()))


def feed(db_path: str | Path, report_id: str, failing: list[dict], max_items: int, per_bucket_cap: int) -> dict[str, int]:
    """Add a rejected candidate's failing items to the replay table, stratified as in
    :func:`select_hard_examples`; items already in the table are skipped before selecting, so the
    quota goes to new ones. Returns the rows added per bucket."""
    _check_limits(max_items, per_bucket_cap)
    unique = _unique_failing(failing)
    with connect(db_path) as con:
        ensure_schema(con)
        known = {r["example_id"] for r in query_dicts(con, f"SELECT example_id FROM {REPLAY_TABLE}")}
        chosen = select_hard_examples([r for r in unique if r["example_id"] not in known], max_items, per_bucket_cap)
        now = utcnow()
        insert_rows(con, REPLAY_TABLE, REPLAY_COLUMNS, [
            {**{k: r[k] for k in FAILING_KEYS}, "system": r["system"] or "",
             "meta": r["meta"] if isinstance(r["meta"], str) else json.dumps(r["meta"]),
             "report_id": report_id, "added_at": now, "times_replayed": 0, "last_replayed_in": None}
            for r in chosen])
    return count_by(chosen, "bucket")


def replay_pool(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Every replay row shaped like a corpus record (its own cluster, tier 1, source ``replay``), with
    ``times_replayed`` and ``last_replayed_in``; creates or migrates the table first."""
    ensure_schema(con)
    return query_dicts(
        con,
        f"SELECT example_id AS record_id, example_id AS cluster_id, bucket, 1 AS tier, 'replay' AS source, "
        f"coalesce(system, '') AS system, prompt, response, coalesce(meta, '{{}}') AS meta, "
        f"coalesce(times_replayed, 0) AS times_replayed, last_replayed_in FROM {REPLAY_TABLE} ORDER BY example_id")


def counts_before(pool: list[dict], version_id: str) -> list[dict]:
    """The pool as it was before ``version_id`` took its rows (that version's own count taken off)."""
    return [{**r, "times_replayed": r["times_replayed"] - 1} if r.get("last_replayed_in") == version_id else r
            for r in pool]


def draw(pool: list[dict], limit: int, per_bucket: dict[str, int], seed: int) -> list[dict]:
    """Replay rows for a mix: taken in turns across buckets (see :func:`round_robin`), in each bucket the
    rows replayed the fewest times first, ties in a seeded order of their ids (a new row does not
    reorder the others)."""
    by_bucket: dict[str, list[dict]] = {}
    for r in pool:
        by_bucket.setdefault(r["bucket"], []).append(r)
    for rows in by_bucket.values():
        rows.sort(key=lambda r: (r.get("times_replayed") or 0, zlib.crc32(f"{seed}:{r['record_id']}".encode()), r["record_id"]))
    return round_robin(by_bucket, limit, per_bucket)


def mark_replayed(con: duckdb.DuckDBPyConnection, version_id: str, example_ids: Iterable[str]) -> int:
    """Count one more replay for every row ``version_id`` took (call it in the transaction that writes
    the version). A version counts once per row: writing it again changes nothing. Returns rows counted."""
    ids = sorted(set(example_ids))
    if not ids:
        return 0
    rows = con.execute(
        f"UPDATE {REPLAY_TABLE} SET times_replayed = coalesce(times_replayed, 0) + 1, last_replayed_in = ? "
        "WHERE example_id IN (SELECT unnest(?::VARCHAR[])) AND last_replayed_in IS DISTINCT FROM ?",
        [version_id, ids, version_id],
    ).fetchall()
    return int(rows[0][0]) if rows else 0


def times_replayed_histogram(rows: Iterable[dict]) -> dict[str, int]:
    """How many rows were replayed 0, 1, 2, ... times."""
    counts: dict[int, int] = {}
    for r in rows:
        t = int(r.get("times_replayed") or 0)
        counts[t] = counts.get(t, 0) + 1
    return {str(t): n for t, n in sorted(counts.items())}


__all__ = ["REPLAY_TABLE", "REPLAY_COLUMNS", "FAILING_KEYS", "ensure_schema", "round_robin", "select_hard_examples",
           "feed", "replay_pool", "counts_before", "draw", "mark_replayed", "count_by", "times_replayed_histogram"]
