"""The release registry: every release ever made, and one movable ``live`` pointer, in DuckDB.

A release names a published checkpoint (path + its manifest digest), the data version it was trained
on and the gate report that let it through. Moving ``live`` (a release, a rollback, a hot switch) is
one transaction that also appends to ``release_events``, so the pointer and its history never
disagree; across processes DuckDB's file lock serialises writers (see :mod:`sleep_pipeline.store`),
and a transaction conflict inside one process is retried. A checkpoint is re-verified against its
manifest before ``live`` may point at it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from sleep_pipeline.checkpoint import CheckpointError, verify_checkpoint
from sleep_pipeline.store import connect, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    version VARCHAR PRIMARY KEY, seq INTEGER, checkpoint_path VARCHAR, checkpoint_sha256 VARCHAR,
    data_version VARCHAR, gate_report_id VARCHAR, rhythm VARCHAR, created_at TIMESTAMP, notes VARCHAR
);
CREATE TABLE IF NOT EXISTS release_pointer (
    name VARCHAR PRIMARY KEY, version VARCHAR, updated_at TIMESTAMP, reason VARCHAR
);
CREATE TABLE IF NOT EXISTS release_events (
    event_at TIMESTAMP, action VARCHAR, from_version VARCHAR, to_version VARCHAR, reason VARCHAR
);
"""
LIVE = "live"


class ReleaseError(RuntimeError):
    """A release or rollback was refused; the live pointer did not move."""


@dataclass(frozen=True)
class Release:
    version: str
    seq: int
    checkpoint_path: str
    checkpoint_sha256: str
    data_version: str
    gate_report_id: str
    rhythm: str
    created_at: object
    notes: str


def _transaction(db_path: Path, fn, attempts: int = 20):
    """Run ``fn(con)`` in one transaction; retry on a write conflict with another connection."""
    for attempt in range(attempts):
        with connect(db_path) as con:
            con.execute(SCHEMA)
            try:
                con.execute("BEGIN TRANSACTION")
                out = fn(con)
                con.execute("COMMIT")
                return out
            except duckdb.TransactionException:
                con.execute("ROLLBACK")
                if attempt == attempts - 1:
                    raise
            except BaseException:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass
                raise
        time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _live(con) -> str | None:
    row = con.execute("SELECT version FROM release_pointer WHERE name = ?", [LIVE]).fetchone()
    return row[0] if row else None


def _move_live(con, to_version: str, action: str, reason: str) -> None:
    before = _live(con)
    now = utcnow()
    con.execute("DELETE FROM release_pointer WHERE name = ?", [LIVE])
    con.execute("INSERT INTO release_pointer VALUES (?, ?, ?, ?)", [LIVE, to_version, now, reason])
    con.execute("INSERT INTO release_events VALUES (?, ?, ?, ?, ?)", [now, action, before, to_version, reason])


def _verified_sha(checkpoint: Path) -> str:
    try:
        return verify_checkpoint(checkpoint)["checkpoint_sha256"]
    except CheckpointError as exc:
        raise ReleaseError(f"refusing to release {checkpoint}: {exc}") from exc


def release(db_path: Path, checkpoint: Path, data_version: str, gate_report_id: str, rhythm: str = "weekly",
            expected_sha256: str | None = None, notes: str = "") -> Release:
    """Register ``checkpoint`` as a new release and make it live, atomically. ``expected_sha256`` is
    the digest the gate evaluated: a checkpoint changed since then is refused."""
    checkpoint = Path(checkpoint).resolve()
    sha = _verified_sha(checkpoint)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ReleaseError(f"{checkpoint} changed since it was gated (sha256 {sha[:12]} != {expected_sha256[:12]})")

    def do(con):
        seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM releases").fetchone()[0]
        version = f"v{seq:04d}"
        con.execute("INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [version, seq, str(checkpoint), sha, data_version, gate_report_id, rhythm, utcnow(), notes])
        _move_live(con, version, "release", f"gate report {gate_report_id} passed")
        return version

    version = _transaction(db_path, do)
    return get(db_path, version)


def record_rejection(db_path: Path, candidate: str, reason: str) -> None:
    """A failed gate: ``live`` stays where it is; the refusal is kept in the history."""

    def do(con):
        con.execute("INSERT INTO release_events VALUES (?, ?, ?, ?, ?)", [utcnow(), "rejected", _live(con), candidate, reason])

    _transaction(db_path, do)


def rollback(db_path: Path, version: str | None = None, reason: str = "manual rollback") -> Release:
    """Point ``live`` at ``version`` or, by default, at the release that was live before the current
    one (hot switch back). The target's checkpoint must still verify."""

    def do(con):
        current = _live(con)
        if current is None:
            raise ReleaseError("nothing is live: there is no release to roll back from")
        if version is None:
            row = con.execute(
                "SELECT version FROM releases WHERE seq < (SELECT seq FROM releases WHERE version = ?) ORDER BY seq DESC LIMIT 1",
                [current]).fetchone()
            if row is None:
                raise ReleaseError(f"{current} is the first release: there is no earlier one to roll back to")
            target = row[0]
        else:
            target = version
        rel = con.execute("SELECT checkpoint_path, checkpoint_sha256 FROM releases WHERE version = ?", [target]).fetchone()
        if rel is None:
            raise ReleaseError(f"unknown release {target!r}")
        if target == current:
            raise ReleaseError(f"{target} is already live")
        sha = _verified_sha(Path(rel[0]))
        if sha != rel[1]:
            raise ReleaseError(f"{target}'s checkpoint changed since it was released")
        _move_live(con, target, "rollback", reason)
        return target

    return get(db_path, _transaction(db_path, do))


def get(db_path: Path, version: str) -> Release:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        row = con.execute(f"SELECT {', '.join(Release.__dataclass_fields__)} FROM releases WHERE version = ?", [version]).fetchone()
    if row is None:
        raise ReleaseError(f"unknown release {version!r}")
    return Release(*row)


def live(db_path: Path) -> Release | None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        version = _live(con)
    return get(db_path, version) if version else None


def list_releases(db_path: Path) -> list[Release]:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute(f"SELECT {', '.join(Release.__dataclass_fields__)} FROM releases ORDER BY seq").fetchall()
    return [Release(*r) for r in rows]


def events(db_path: Path) -> list[tuple]:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        return con.execute("SELECT event_at, action, from_version, to_version, reason FROM release_events ORDER BY event_at").fetchall()
