"""The rater queue: a seeded sample of every dream batch, spot-checked by a person before release.

``sleep-pipeline rater next`` shows the oldest pending item, ``approve ITEM`` / ``reject ITEM --note``
decide it. A batch is *approved* when every sampled item is approved, *rejected* when any is rejected,
*pending* otherwise. :func:`release_block` is what the gate asks: a candidate trained on a dream batch
may be released only when that batch is approved, unless the rhythm's recipe allows auto-approval
(nightly LoRA-only dreams), and the reason is written into the gate report either way.
"""

from __future__ import annotations

import random
from pathlib import Path

from sleep_pipeline.dream import redteam
from sleep_pipeline.store import connect, insert_rows, query_dicts, table_exists, utcnow

QUEUE_TABLE = "rater_queue"
QUEUE_COLUMNS = ("batch_id", "item_id", "strategy", "bucket", "system", "prompt", "chosen", "rejected", "status",
                 "reviewer", "note", "queued_at", "reviewed_at")
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {QUEUE_TABLE} (
    batch_id VARCHAR, item_id VARCHAR, strategy VARCHAR, bucket VARCHAR, system VARCHAR, prompt VARCHAR,
    chosen VARCHAR, rejected VARCHAR, status VARCHAR, reviewer VARCHAR, note VARCHAR,
    queued_at TIMESTAMP, reviewed_at TIMESTAMP
)"""
DECISIONS = {"approve": "approved", "reject": "rejected"}


class RaterError(RuntimeError):
    pass


def ensure_schema(con) -> None:
    con.execute(_CREATE)


def enqueue(db_path: Path, batch_id: str, items: list, sample: int, seed: int) -> list[str]:
    """Queue a seeded sample of ``sample`` accepted items of a batch (all of them when fewer)."""
    chosen = random.Random(seed).sample(items, min(sample, len(items)))
    now = utcnow()
    rows = [{"batch_id": batch_id, "item_id": it.item_id, "strategy": it.strategy, "bucket": it.bucket,
             "system": it.system, "prompt": redteam.render(it.history, it.prompt), "chosen": it.chosen, "rejected": it.rejected,
             "status": "pending", "queued_at": now} for it in chosen]
    with connect(db_path) as con:
        ensure_schema(con)
        con.execute(f"DELETE FROM {QUEUE_TABLE} WHERE batch_id = ? AND status = 'pending'", [batch_id])
        insert_rows(con, QUEUE_TABLE, QUEUE_COLUMNS, rows)
    return [r["item_id"] for r in rows]


def next_pending(db_path: Path, batch_id: str | None = None) -> dict | None:
    with connect(db_path) as con:
        if not table_exists(con, QUEUE_TABLE):
            return None
        where, params = ("AND batch_id = ?", [batch_id]) if batch_id else ("", [])
        rows = query_dicts(con, f"SELECT * FROM {QUEUE_TABLE} WHERE status = 'pending' {where} "
                                "ORDER BY queued_at, batch_id, item_id LIMIT 1", params)
    return rows[0] if rows else None


def decide(db_path: Path, item_id: str, decision: str, reviewer: str, note: str = "", batch_id: str | None = None) -> dict:
    """Record a person's decision on a queued item (a prefix of its id is enough when unambiguous)."""
    if decision not in DECISIONS:
        raise RaterError(f"decision must be one of {sorted(DECISIONS)}, got {decision!r}")
    if not reviewer.strip():
        raise RaterError("a decision needs a reviewer name")
    with connect(db_path) as con:
        if not table_exists(con, QUEUE_TABLE):
            raise RaterError("the rater queue is empty: no dream batch has been queued")
        where, params = ("item_id LIKE ?", [item_id + "%"])
        if batch_id:
            where, params = where + " AND batch_id = ?", params + [batch_id]
        rows = query_dicts(con, f"SELECT batch_id, item_id, status FROM {QUEUE_TABLE} WHERE {where}", params)
        if not rows:
            raise RaterError(f"no queued item {item_id!r}")
        if len(rows) > 1:
            raise RaterError(f"{item_id!r} matches {len(rows)} queued items; give more of the id or --batch")
        row = rows[0]
        con.execute(f"UPDATE {QUEUE_TABLE} SET status = ?, reviewer = ?, note = ?, reviewed_at = ? "
                    "WHERE batch_id = ? AND item_id = ?",
                    [DECISIONS[decision], reviewer, note, utcnow(), row["batch_id"], row["item_id"]])
    return {**row, "status": DECISIONS[decision]}


def batch_status(db_path: Path, batch_id: str) -> dict:
    """Counts per status and the batch's state: ``approved``, ``rejected``, ``pending`` or ``empty``."""
    with connect(db_path) as con:
        if not table_exists(con, QUEUE_TABLE):
            counts = {}
        else:
            counts = {r["status"]: r["n"] for r in query_dicts(
                con, f"SELECT status, count(*) AS n FROM {QUEUE_TABLE} WHERE batch_id = ? GROUP BY status", [batch_id])}
    if not counts:
        state = "empty"
    elif counts.get("rejected"):
        state = "rejected"
    elif counts.get("pending"):
        state = "pending"
    else:
        state = "approved"
    return {"batch_id": batch_id, "state": state, **{k: counts.get(k, 0) for k in ("pending", "approved", "rejected")}}


def release_block(db_path: Path, batch_id: str | None, auto_approve: bool) -> tuple[str | None, str]:
    """(why the release is blocked, or None; what the gate report says about the spot-check). Fails closed:
    a batch with nothing queued blocks like an unreviewed one."""
    if batch_id is None:
        return None, "no dream batch behind this candidate: nothing to review"
    status = batch_status(db_path, batch_id)
    counts = f"{status['approved']} approved, {status['rejected']} rejected, {status['pending']} pending"
    if status["state"] == "approved":
        return None, f"dream batch {batch_id} spot-checked by people: {counts}"
    if status["state"] == "rejected":
        return f"dream batch {batch_id}: a rater rejected a sampled item ({counts})", f"rejected by a rater: {counts}"
    if auto_approve:
        return None, f"dream batch {batch_id} auto-approved by the rhythm's recipe, not reviewed by people ({counts})"
    why = f"dream batch {batch_id} is not reviewed yet ({counts or 'nothing queued'}): run `sleep-pipeline rater next`"
    return why, f"awaiting review: {counts}"
