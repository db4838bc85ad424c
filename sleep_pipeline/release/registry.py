"""The release registry: every release ever made, and one movable ``live`` pointer, in DuckDB.

A release names a published checkpoint (path + its content digest, which is also its candidate id),
the data version it was trained on and the gate report that let it through. Moving ``live`` (a release,
a rollback, a hot switch, a revocation) is one transaction that also appends to ``release_events``, so
the pointer and its history never disagree; the caller can add its own bookkeeping (the gate report
and the candidate marked released) to the same transaction. Across processes DuckDB's file lock
serialises writers (see :mod:`sleep_pipeline.store`), and a transaction conflict inside one process is
retried. A checkpoint is re-verified against its manifest before ``live`` may point at it.

Rollback goes back along the history of the pointer — to the release that was live before the current
one, not to the previous version number — and skips revoked releases, so "rollback, new release,
rollback" never lands on a release that was rolled away from and revoked.

Two channels: ``live`` (stable, what users get) and ``canary`` beside it. A release made into the canary
channel moves only the ``canary`` pointer; :func:`promote` makes it live after its soak (or when a person
says so). A *regression alarm* (:func:`raise_alarm`: production monitoring, a person, or the retrieval
index's answer accuracy) on a release keeps its canary from being promoted, lets a rejected daily
candidate roll live back, and can start a cycle early (the training trigger).
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
ALTER TABLE releases ADD COLUMN IF NOT EXISTS revoked_at TIMESTAMP;
ALTER TABLE releases ADD COLUMN IF NOT EXISTS revoke_reason VARCHAR;
ALTER TABLE releases ADD COLUMN IF NOT EXISTS cycle_id VARCHAR;
ALTER TABLE releases ADD COLUMN IF NOT EXISTS cadence VARCHAR;
CREATE TABLE IF NOT EXISTS regression_alarms (
    alarm_id VARCHAR PRIMARY KEY, raised_at TIMESTAMP, version VARCHAR, source VARCHAR, reason VARCHAR,
    cleared_at TIMESTAMP, clear_reason VARCHAR
);
"""
LIVE = "live"
CANARY = "canary"
CHANNELS = (LIVE, CANARY)


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
    revoked_at: object = None
    revoke_reason: str | None = None
    cycle_id: str | None = None
    cadence: str | None = None  # the rhythm (weekly, monthly, daily) whose cycle made it

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


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


def _live(con, channel: str = LIVE) -> str | None:
    rows = con.execute("SELECT version FROM release_pointer WHERE name = ?", [channel]).fetchall()
    return rows[0][0] if rows else None


def live_sha(con) -> str | None:
    """The content digest (candidate id) of the live release, on an open connection."""
    con.execute(SCHEMA)
    rows = con.execute("SELECT r.checkpoint_sha256 FROM release_pointer p JOIN releases r ON r.version = p.version "
                       "WHERE p.name = ?", [LIVE]).fetchall()
    return rows[0][0] if rows else None


def released_shas(con) -> set[str]:
    """Digests of every checkpoint ever released (revoked ones included: their files are evidence)."""
    con.execute(SCHEMA)
    return {r[0] for r in con.execute("SELECT checkpoint_sha256 FROM releases").fetchall()}


def _previous_live(con, current: str) -> str | None:
    """The release that was live before ``current`` became live, skipping revoked ones (following the
    pointer's history further back past each of them)."""
    revoked = {r[0] for r in con.execute("SELECT version FROM releases WHERE revoked_at IS NOT NULL").fetchall()}
    seen, version = {current}, current
    while True:
        rows = con.execute("SELECT from_version FROM release_events WHERE to_version = ? AND action IN "
                           "('release', 'rollback', 'revoke', 'promote') ORDER BY event_at DESC LIMIT 1", [version]).fetchall()
        before = rows[0][0] if rows else None
        if before is None or before in seen:
            return None
        if before not in revoked:
            return before
        seen.add(before)
        version = before


def _move_live(con, to_version: str, action: str, reason: str, channel: str = LIVE) -> None:
    before = _live(con, channel)
    now = utcnow()
    con.execute("DELETE FROM release_pointer WHERE name = ?", [channel])
    con.execute("INSERT INTO release_pointer VALUES (?, ?, ?, ?)", [channel, to_version, now, reason])
    # the canary channel's moves are recorded as their own actions, which the live history walk skips
    con.execute("INSERT INTO release_events VALUES (?, ?, ?, ?, ?)",
                [now, action if channel == LIVE else f"{channel}:{action}", before, to_version, reason])


def _verified_sha(checkpoint: Path) -> str:
    try:
        return verify_checkpoint(checkpoint)["checkpoint_sha256"]
    except CheckpointError as exc:
        raise ReleaseError(f"refusing to release {checkpoint}: {exc}") from exc


def release(db_path: Path, checkpoint: Path, data_version: str, gate_report_id: str, rhythm: str = "weekly",
            expected_sha256: str | None = None, notes: str = "", also=None, channel: str = LIVE,
            cycle_id: str | None = None, cadence: str | None = None) -> Release:
    """Register ``checkpoint`` as a new release and point ``channel`` (live, or canary) at it, atomically.
    ``expected_sha256`` is the digest the gate evaluated: a checkpoint changed since then is refused.
    ``also(con, version)`` runs inside the same transaction (the caller's bookkeeping): if it raises,
    nothing is released."""
    if channel not in CHANNELS:
        raise ReleaseError(f"unknown channel {channel!r} (known: {', '.join(CHANNELS)})")
    checkpoint = Path(checkpoint).resolve()
    sha = _verified_sha(checkpoint)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ReleaseError(f"{checkpoint} changed since it was gated (sha256 {sha[:12]} != {expected_sha256[:12]})")

    def do(con):
        seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM releases").fetchall()[0][0]
        version = f"v{seq:04d}"
        con.execute("INSERT INTO releases (version, seq, checkpoint_path, checkpoint_sha256, data_version, "
                    "gate_report_id, rhythm, created_at, notes, cycle_id, cadence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [version, seq, str(checkpoint), sha, data_version, gate_report_id, rhythm, utcnow(), notes,
                     cycle_id, cadence])
        _move_live(con, version, "release", f"gate report {gate_report_id} passed", channel)
        if also is not None:
            also(con, version)
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
        target = version or _previous_live(con, current)
        if target is None:
            raise ReleaseError(f"{current} is the first usable release: there is no earlier one to roll back to "
                               "(revoked releases are skipped)")
        _switch(con, current, target, "rollback", reason)
        return target

    return get(db_path, _transaction(db_path, do))


def _switch(con, current: str | None, target: str, action: str, reason: str) -> None:
    """Point live at ``target`` (an existing, unrevoked release whose files still verify)."""
    rows = con.execute("SELECT checkpoint_path, checkpoint_sha256, revoked_at FROM releases WHERE version = ?",
                       [target]).fetchall()
    if not rows:
        raise ReleaseError(f"unknown release {target!r}")
    path, sha, revoked_at = rows[0]
    if target == current:
        raise ReleaseError(f"{target} is already live")
    if revoked_at is not None:
        raise ReleaseError(f"{target} was revoked and cannot go live again")
    if _verified_sha(Path(path)) != sha:
        raise ReleaseError(f"{target}'s checkpoint changed since it was released")
    _move_live(con, target, action, reason)


def revoke(db_path: Path, version: str, reason: str) -> tuple[Release, Release | None]:
    """Mark ``version`` unusable: rollbacks skip it and it can never go live again. If it is live, live
    goes back to the release that was live before it, in the same transaction (refused when there is
    none). Returns (the revoked release, the live release after)."""
    if not reason.strip():
        raise ReleaseError("a revocation needs a reason")

    def do(con):
        rows = con.execute("SELECT revoked_at FROM releases WHERE version = ?", [version]).fetchall()
        if not rows:
            raise ReleaseError(f"unknown release {version!r}")
        if rows[0][0] is not None:
            raise ReleaseError(f"{version} is already revoked")
        current = _live(con)
        con.execute("UPDATE releases SET revoked_at = ?, revoke_reason = ? WHERE version = ?", [utcnow(), reason, version])
        if _live(con, CANARY) == version:  # a revoked canary is withdrawn: nothing is left to promote
            con.execute("DELETE FROM release_pointer WHERE name = ?", [CANARY])
            con.execute("INSERT INTO release_events VALUES (?, ?, ?, ?, ?)",
                        [utcnow(), f"{CANARY}:withdrawn", version, None, reason])
        if current == version:
            target = _previous_live(con, version)
            if target is None:
                raise ReleaseError(f"{version} is live and no earlier usable release exists to switch to: "
                                   "release a replacement first")
            _switch(con, current, target, "revoke", f"{version} revoked: {reason}")
        else:
            # recorded without moving live (an action the pointer's history walk does not follow)
            con.execute("INSERT INTO release_events VALUES (?, ?, ?, ?, ?)",
                        [utcnow(), "revoked", version, None, reason])
        return _live(con)

    now_live = _transaction(db_path, do)
    return get(db_path, version), (get(db_path, now_live) if now_live else None)


def get(db_path: Path, version: str) -> Release:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute(f"SELECT {', '.join(Release.__dataclass_fields__)} FROM releases WHERE version = ?", [version]).fetchall()
    if not rows:
        raise ReleaseError(f"unknown release {version!r}")
    return Release(*rows[0])


def live(db_path: Path, channel: str = LIVE) -> Release | None:
    """The release ``channel`` (live, or canary) points at, or None."""
    with connect(db_path) as con:
        con.execute(SCHEMA)
        version = _live(con, channel)
    return get(db_path, version) if version else None


def canary(db_path: Path) -> tuple[Release, object] | None:
    """The canary release and when it became the canary, or None."""
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute("SELECT version, updated_at FROM release_pointer WHERE name = ?", [CANARY]).fetchall()
    return (get(db_path, rows[0][0]), rows[0][1]) if rows else None


def promote(db_path: Path, version: str | None = None, reason: str = "promoted") -> Release:
    """Make the canary release live (stable) and empty the canary channel, in one transaction.
    ``version`` (optional) must name the canary: a promotion meant for another canary is refused. A
    canary with an open regression alarm is refused too (clear the alarm or revoke the canary)."""

    def do(con):
        target = _live(con, CANARY)
        if target is None:
            raise ReleaseError("there is no canary release to promote")
        if version is not None and version != target:
            raise ReleaseError(f"{version} is not the canary (the canary is {target})")
        alarms = _open_alarms(con, target)
        if alarms:
            raise ReleaseError(f"{target} has an open regression alarm ({alarms[0]['reason']}): not promoted; "
                               "clear it (`sleep-pipeline alarm clear`) or revoke the canary")
        current = _live(con)
        if current == target:
            raise ReleaseError(f"{target} is already live")
        _switch(con, current, target, "promote", reason)
        con.execute("DELETE FROM release_pointer WHERE name = ?", [CANARY])
        return target

    return get(db_path, _transaction(db_path, do))


def _open_alarms(con, version: str | None = None) -> list[dict]:
    where, params = ("AND version = ?", [version]) if version else ("", [])
    cols = ["alarm_id", "raised_at", "version", "source", "reason"]
    rows = con.execute(f"SELECT {', '.join(cols)} FROM regression_alarms WHERE cleared_at IS NULL {where} "
                       "ORDER BY raised_at", params).fetchall()
    return [dict(zip(cols, r)) for r in rows]


def raise_alarm(db_path: Path, version: str, reason: str, source: str = "person") -> str:
    """Record a regression alarm on release ``version`` (the live one, or the canary). Returns its id."""
    import uuid

    if not reason.strip():
        raise ReleaseError("an alarm needs a reason")
    get(db_path, version)
    alarm_id = uuid.uuid4().hex[:12]

    def do(con):
        con.execute("INSERT INTO regression_alarms VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                    [alarm_id, utcnow(), version, source, reason])

    _transaction(db_path, do)
    return alarm_id


def clear_alarm(db_path: Path, alarm_id: str, reason: str) -> None:
    def do(con):
        n = con.execute("SELECT count(*) FROM regression_alarms WHERE alarm_id = ? AND cleared_at IS NULL",
                        [alarm_id]).fetchall()[0][0]
        if not n:
            raise ReleaseError(f"no open alarm {alarm_id!r}")
        con.execute("UPDATE regression_alarms SET cleared_at = ?, clear_reason = ? WHERE alarm_id = ?",
                    [utcnow(), reason, alarm_id])

    _transaction(db_path, do)


def open_alarms(db_path: Path, version: str | None = None) -> list[dict]:
    """Alarms not cleared yet (on ``version``, or on any release), oldest first."""
    with connect(db_path) as con:
        con.execute(SCHEMA)
        return _open_alarms(con, version)


def list_releases(db_path: Path) -> list[Release]:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute(f"SELECT {', '.join(Release.__dataclass_fields__)} FROM releases ORDER BY seq").fetchall()
    return [Release(*r) for r in rows]


def events(db_path: Path) -> list[tuple]:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        return con.execute("SELECT event_at, action, from_version, to_version, reason FROM release_events ORDER BY event_at").fetchall()
