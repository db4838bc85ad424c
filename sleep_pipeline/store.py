"""The project's DuckDB database: short-lived connections that wait out the file lock.

DuckDB lets only one process hold a database file open; a second process's ``connect`` fails at once
with "Could not set lock on file", even to read. Dagster runs steps in separate processes and the
webserver runs alongside, so every user of the database goes through :func:`connect`: it retries
that error with jittered exponential backoff, and callers keep the connection only for the reads
and writes themselves (compute first, then open, write, close).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import time
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa

LOCK_WAIT_S = 300.0


class DatabaseBusyError(RuntimeError):
    """Another process held the database file for longer than the wait allowed."""


HEADER_BYTES = 3 * 4096  # a DuckDB file starts with three 4 KiB header blocks


def _is_lock_error(exc: BaseException) -> bool:
    msg = str(exc)
    return "Could not set lock on file" in msg or "Conflicting lock is held" in msg


def _being_created(exc: BaseException, path: Path) -> bool:
    """Another process has created the file and not yet written its header: the file exists, shorter than
    the header, and DuckDB calls it invalid. A complete but corrupt file is not retried."""
    try:
        short = path.stat().st_size < HEADER_BYTES
    except OSError:
        short = True  # gone again: the creator is still at it
    return "not a valid DuckDB database file" in str(exc) and short


@contextlib.contextmanager
def connect(path: str | Path, read_only: bool = False, wait_s: float = LOCK_WAIT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path``, retrying while another process holds its lock or is still writing the header of the
    file it just created; always closed on exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not (_is_lock_error(exc) or _being_created(exc, path)):
                raise
            if time.monotonic() >= deadline:
                raise DatabaseBusyError(
                    f"{path} stayed locked by another process for {wait_s:.0f}s: {exc}"
                ) from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
    try:
        yield con
    finally:
        con.close()


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    # fetchall, not fetchone: DuckDB 2 keeps a partly fetched result open, and the connection's next
    # relation query (``con.sql``) then fails with "connection has an unfinished result"
    rows = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
    ).fetchall()
    return bool(rows and rows[0][0])


def query_dicts(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    """Every row of ``sql`` as a dict, fully fetched (so the connection is free for the next query)."""
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


SCHEMA = """
CREATE TABLE IF NOT EXISTS raw_records (
    source VARCHAR, tier INTEGER, record_id VARCHAR, line_no BIGINT, bucket VARCHAR,
    system VARCHAR, prompt VARCHAR, response VARCHAR, meta VARCHAR, ingest_id VARCHAR
);
CREATE TABLE IF NOT EXISTS source_ingests (
    ingest_id VARCHAR, source VARCHAR, path VARCHAR, format VARCHAR, tier INTEGER,
    content_sha256 VARCHAR, lines_in BIGINT, records_ok BIGINT, quarantined BIGINT,
    ingested_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS quarantine (
    stage VARCHAR, source VARCHAR, line_no BIGINT, record_id VARCHAR, reason VARCHAR,
    detail VARCHAR, excerpt VARCHAR, run_ref VARCHAR, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS deduped_corpus (
    record_id VARCHAR, source VARCHAR, tier INTEGER, line_no BIGINT, bucket VARCHAR,
    system VARCHAR, prompt VARCHAR, response VARCHAR, meta VARCHAR, cluster_id VARCHAR,
    pii_scrubbed VARCHAR, corpus_version VARCHAR
);
CREATE TABLE IF NOT EXISTS duplicates (
    record_id VARCHAR, source VARCHAR, tier INTEGER, line_no BIGINT, duplicate_of VARCHAR,
    kind VARCHAR, similarity DOUBLE, cluster_id VARCHAR, corpus_version VARCHAR
);
CREATE TABLE IF NOT EXISTS corpus_versions (
    corpus_version VARCHAR, created_at TIMESTAMP, stats VARCHAR
);
CREATE TABLE IF NOT EXISTS data_versions (
    version_id VARCHAR, parent_version VARCHAR, corpus_version VARCHAR, config_hash VARCHAR,
    created_at TIMESTAMP, manifest VARCHAR
);
CREATE TABLE IF NOT EXISTS data_mix (
    version_id VARCHAR, split VARCHAR, record_id VARCHAR, cluster_id VARCHAR, bucket VARCHAR,
    tier INTEGER, source VARCHAR, origin VARCHAR, system VARCHAR, prompt VARCHAR,
    response VARCHAR, meta VARCHAR
);
"""


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, columns, rows: list[dict]) -> None:
    """Bulk insert dicts (missing keys become NULL) through an Arrow table."""
    if not rows:
        return
    arrow = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    con.register("_rows", arrow)
    try:
        con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM _rows")
    finally:
        con.unregister("_rows")


def latest_ingests(con: duckdb.DuckDBPyConnection, sources: list[str]) -> dict[str, tuple[int, int, str]]:
    """The newest ingest of each named source: {source: (lines_in, quarantined, content_sha256)}."""
    rows = con.execute(
        """SELECT source, lines_in, quarantined, content_sha256 FROM (
               SELECT *, row_number() OVER (PARTITION BY source ORDER BY ingested_at DESC) AS rn
               FROM source_ingests) WHERE rn = 1 AND source IN (SELECT unnest(?::VARCHAR[]))""",
        [sources],
    ).fetchall()
    return {s: (lines, q, sha) for s, lines, q, sha in rows}
