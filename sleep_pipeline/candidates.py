"""Model candidates: every model a cycle produces, with an identity, a phase and its lineage.

A candidate is a published checkpoint (:mod:`sleep_pipeline.checkpoint`) registered in the DuckDB
table ``candidates``. Its id is the checkpoint's content digest (``checkpoint_sha256``: weights,
tokenizer and config), so the same weights are the same candidate wherever they lie. It records the
phase that made it (``import``, ``learn``, ``compress``, ``dream``), its parent candidate id(s), the
data version and recipe hash it was made with, and a status:

``candidate`` (made, not gated yet) → ``passed`` / ``rejected`` (by a gate) → ``released``; and
``pruned`` (files deleted by retention) or ``purged`` (files deleted on request).

Stages pass candidates by id — the id the upstream materialisation recorded — never "the newest
directory on disk". Retention lives here because only the registry knows what must never be deleted:
the live release, anything ever released (unless purged explicitly), anything a running gate holds a
lease on, and candidates that are still waiting for their gate.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sleep_pipeline.checkpoint import (
    CheckpointError, abandoned_staging, pid_alive, remove_checkpoint, verify_checkpoint,
)
from sleep_pipeline.store import connect, query_dicts, utcnow

PHASES = ("import", "learn", "compress", "dream")
CANDIDATE, PASSED, REJECTED, RELEASED, PRUNED, PURGED = "candidate", "passed", "rejected", "released", "pruned", "purged"
GONE = (PRUNED, PURGED)
# an ungated candidate is kept this long for its gate, whatever keep_last says
AWAITING_GATE_S = 7 * 24 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS candidates (
    candidate_id VARCHAR PRIMARY KEY, phase VARCHAR, parents VARCHAR, data_version VARCHAR,
    recipe_hash VARCHAR, base_model VARCHAR, path VARCHAR, created_at TIMESTAMP, status VARCHAR,
    status_reason VARCHAR, updated_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS candidate_leases (
    lease_id VARCHAR PRIMARY KEY, candidate_id VARCHAR, holder VARCHAR, host VARCHAR, pid INTEGER,
    acquired_at TIMESTAMP
);
"""


class CandidateError(RuntimeError):
    """An unknown, ambiguous or unusable candidate."""


@dataclass(frozen=True)
class Candidate:
    candidate_id: str
    phase: str
    parents: tuple[str, ...]
    data_version: str | None
    recipe_hash: str | None
    base_model: str | None
    path: str
    created_at: object
    status: str
    status_reason: str | None = None
    updated_at: object = None

    @property
    def short(self) -> str:
        return self.candidate_id[:12]

    def to_metadata(self) -> dict:
        """What an asset records about the candidate it produced or used."""
        return {"candidate_id": self.candidate_id, "phase": self.phase, "parents": ", ".join(self.parents) or "none",
                "data_version": self.data_version or "none", "candidate_path": self.path}


_COLUMNS = list(Candidate.__dataclass_fields__)


def ensure_schema(con) -> None:
    con.execute(SCHEMA)


def _row(row: dict) -> Candidate:
    return Candidate(**{**row, "parents": tuple(json.loads(row["parents"] or "[]"))})


def _select(con, where: str = "", params: list | None = None) -> list[Candidate]:
    ensure_schema(con)
    return [_row(r) for r in query_dicts(con, f"SELECT {', '.join(_COLUMNS)} FROM candidates {where}", params)]


def register(db_path: Path, path: Path, phase: str | None = None) -> Candidate:
    """Register the published checkpoint at ``path`` (verified first) and return its candidate. The same
    content registered again returns the existing candidate (its path is updated only when the old
    directory no longer exists)."""
    path = Path(path).resolve()
    try:
        manifest = verify_checkpoint(path)
    except CheckpointError as exc:
        raise CandidateError(f"not a publishable candidate: {exc}") from exc
    phase = phase or manifest.get("phase") or manifest.get("kind")
    if phase not in PHASES:
        raise CandidateError(f"{path}: unknown phase {phase!r} (known: {', '.join(PHASES)})")
    cid = manifest["checkpoint_sha256"]
    with connect(db_path) as con:
        existing = _select(con, "WHERE candidate_id = ?", [cid])
        if existing:
            old = existing[0]
            if old.status in GONE or not Path(old.path).is_dir():
                con.execute("UPDATE candidates SET path = ?, status = ?, status_reason = ?, updated_at = ? "
                            "WHERE candidate_id = ?", [str(path), CANDIDATE if old.status in GONE else old.status,
                                                       "files published again", utcnow(), cid])
                return _select(con, "WHERE candidate_id = ?", [cid])[0]
            return old
        con.execute(f"INSERT INTO candidates ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                    [cid, phase, json.dumps(list(manifest.get("parents") or [])), manifest.get("data_version"),
                     manifest.get("recipe_hash"), manifest.get("base_model"), str(path),
                     utcnow(), CANDIDATE, None, utcnow()])
        return _select(con, "WHERE candidate_id = ?", [cid])[0]


def get(db_path: Path, ref: str) -> Candidate:
    """A candidate by id or unique id prefix (at least 6 characters)."""
    ref = str(ref).strip()
    if len(ref) < 6:
        raise CandidateError(f"candidate id {ref!r} is too short (give at least 6 characters)")
    with connect(db_path) as con:
        found = _select(con, "WHERE candidate_id LIKE ? ORDER BY created_at", [ref + "%"])
    if not found:
        raise CandidateError(f"unknown candidate {ref!r}")
    if len(found) > 1:
        raise CandidateError(f"candidate id prefix {ref!r} is ambiguous: {', '.join(c.short for c in found)}")
    return found[0]


def resolve(db_path: Path | None, ref: str | Path) -> tuple[Path, Candidate | None]:
    """A model to start from: a candidate id (or prefix) in the registry, or a model directory.
    Returns (directory, candidate or None). A candidate whose files are gone is an error."""
    as_path = Path(str(ref)).expanduser()
    if as_path.is_dir():
        return as_path.resolve(), None
    if db_path is None:
        raise CandidateError(f"{ref!r} is not a model directory, and no registry was given to look it up as a candidate id")
    cand = get(db_path, str(ref))
    if cand.status in GONE or not Path(cand.path).is_dir():
        raise CandidateError(f"candidate {cand.short} has no files any more (status {cand.status})")
    return Path(cand.path), cand


def find_same_inputs(db_path: Path, phase: str, data_version: str, recipe_hash: str,
                     parents: tuple[str, ...] | list[str], where=None) -> Candidate | None:
    """An existing candidate made by ``phase`` from the same data version, recipe and parent(s), whose
    files still verify (and whose manifest satisfies ``where``, for inputs these columns do not name):
    training again would only produce the same model under a new name."""
    with connect(db_path) as con:
        rows = _select(con, "WHERE phase = ? AND data_version = ? AND recipe_hash = ? AND parents = ? "
                            "ORDER BY created_at DESC", [phase, data_version, recipe_hash, json.dumps(list(parents))])
    for cand in rows:
        if cand.status in GONE:
            continue
        try:
            manifest = verify_checkpoint(Path(cand.path))
        except CheckpointError:
            continue
        if where is None or where(manifest):
            return cand
    return None


def set_status(con, candidate_id: str, status: str, reason: str = "") -> None:
    """Move a candidate to ``status`` on an open connection (so a release can do it in its transaction).
    A released candidate stays released: a later gate's verdict does not demote it."""
    ensure_schema(con)
    con.execute("UPDATE candidates SET status = ?, status_reason = ?, updated_at = ? WHERE candidate_id = ? "
                "AND (status <> ? OR ? IN (?, ?))",
                [status, reason, utcnow(), candidate_id, RELEASED, status, PURGED, RELEASED])


def mark(db_path: Path, candidate_id: str, status: str, reason: str = "") -> None:
    with connect(db_path) as con:
        set_status(con, candidate_id, status, reason)


def ancestors(db_path: Path, candidate_id: str) -> list[Candidate]:
    """The candidate's lineage, itself first, then its parents breadth-first (unknown ids skipped)."""
    with connect(db_path) as con:
        by_id = {c.candidate_id: c for c in _select(con)}
    out, queue, seen = [], [candidate_id], set()
    while queue:
        cid = queue.pop(0)
        if cid in seen or cid not in by_id:
            continue
        seen.add(cid)
        out.append(by_id[cid])
        queue.extend(by_id[cid].parents)
    return out


def list_candidates(db_path: Path) -> list[Candidate]:
    with connect(db_path) as con:
        return _select(con, "ORDER BY created_at")


# ------------------------------------------------------------------------------------------ leases
def _alive(host: str, pid: int) -> bool:
    # another machine's process: cannot tell, so it holds
    return host != socket.gethostname() or pid_alive(pid)


@contextlib.contextmanager
def lease(db_path: Path, candidate_id: str, holder: str) -> Iterator[None]:
    """Hold ``candidate_id`` for the duration (e.g. a gate evaluating it): retention will not delete it.
    A lease whose process died is ignored."""
    import uuid

    lease_id = uuid.uuid4().hex
    with connect(db_path) as con:
        ensure_schema(con)
        con.execute("INSERT INTO candidate_leases VALUES (?, ?, ?, ?, ?, ?)",
                    [lease_id, candidate_id, holder, socket.gethostname(), os.getpid(), utcnow()])
    try:
        yield
    finally:
        with connect(db_path) as con:
            con.execute("DELETE FROM candidate_leases WHERE lease_id = ?", [lease_id])


def _leased(con) -> set[str]:
    ensure_schema(con)
    held = set()
    for r in query_dicts(con, "SELECT lease_id, candidate_id, host, pid FROM candidate_leases"):
        if _alive(r["host"], r["pid"]):
            held.add(r["candidate_id"])
        else:
            con.execute("DELETE FROM candidate_leases WHERE lease_id = ?", [r["lease_id"]])
    return held


# --------------------------------------------------------------------------------------- retention
def _protected(con) -> dict[str, str]:
    """candidate id -> why it must not be deleted."""
    from sleep_pipeline.release import registry

    why: dict[str, str] = {}
    live = registry.live_sha(con)
    if live:
        why[live] = "live release"
    for sha in registry.released_shas(con):
        why.setdefault(sha, "released")
    for cid in _leased(con):
        why.setdefault(cid, "held by a running gate")
    now = utcnow()
    for c in _select(con, "WHERE status IN (?, ?)", [CANDIDATE, PASSED]):
        if c.status == PASSED or (now - c.created_at).total_seconds() < AWAITING_GATE_S:
            why.setdefault(c.candidate_id, "waiting for its gate" if c.status == CANDIDATE else "passed, not yet released")
    return why


def retain(db_path: Path, root: Path, keep_last: int, log=None) -> list[str]:
    """Delete the files of all but the newest ``keep_last`` deletable candidates under ``root``, and the
    staging directories whose writer is gone. Never deleted: what :func:`_protected` names, and any
    directory that is not a registered candidate (it is reported, not touched). Returns removed ids."""
    root = Path(root).resolve()
    removed = []
    with connect(db_path) as con:
        ensure_schema(con)
        protected = _protected(con)
        cands = [c for c in _select(con, "WHERE status NOT IN (?, ?) ORDER BY created_at", list(GONE))
                 if Path(c.path).parent.resolve() == root]
        deletable = [c for c in cands if c.candidate_id not in protected]
        doomed = deletable[: max(len(deletable) - keep_last, 0)]
        for c in doomed:
            # the status changes first: a crash after it leaves a pruned row with files, never a row
            # that points at deleted files
            set_status(con, c.candidate_id, PRUNED, f"retention: keep_last {keep_last}")
    for c in doomed:
        if Path(c.path).is_dir():
            remove_checkpoint(Path(c.path))
        removed.append(c.candidate_id)
        if log:
            log(f"pruned candidate {c.short} ({Path(c.path).name})")
    for stale in abandoned_staging(root):
        import shutil

        shutil.rmtree(stale, ignore_errors=True)
        if log:
            log(f"removed abandoned staging directory {stale.name}")
    return removed


def purge(db_path: Path, ref: str, reason: str) -> Candidate:
    """Delete a candidate's files even if it was released (never the live one); the row stays."""
    from sleep_pipeline.release import registry

    cand = get(db_path, ref)
    with connect(db_path) as con:
        if registry.live_sha(con) == cand.candidate_id:
            raise CandidateError(f"candidate {cand.short} is the live release: roll back before purging it")
        set_status(con, cand.candidate_id, PURGED, reason)
    if Path(cand.path).is_dir():
        remove_checkpoint(Path(cand.path))
    return get(db_path, cand.candidate_id)

