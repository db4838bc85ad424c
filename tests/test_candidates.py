"""The candidate registry: identity by content digest, lineage, and retention that never deletes what a
release, a rollback or a running gate needs."""

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sleep_pipeline import candidates
from sleep_pipeline.candidates import CandidateError
from sleep_pipeline.checkpoint import publish, staging_dir
from sleep_pipeline.release import registry
from sleep_pipeline.store import connect

CLI = str(Path(sys.executable).parent / "sleep-pipeline")


def make(root: Path, name: str, seed: int, **info) -> Path:
    torch.manual_seed(seed)
    stage = staging_dir(root, name)
    save_file({"w": torch.randn(8)}, str(stage / "model.safetensors"))
    final, _ = publish(stage, root, name, {"phase": "learn", "data_version": "dv-1", "recipe_hash": "r1",
                                           "parents": [], **info})
    return final


def age(db: Path, cid: str, days: float) -> None:
    with connect(db) as con:
        con.execute("UPDATE candidates SET created_at = created_at - ?::INTERVAL WHERE candidate_id = ?", [f"{days} days", cid])


def test_identity_is_the_content_digest_and_ids_resolve_by_prefix(tmp_path):
    db = tmp_path / "sleep.duckdb"
    a = candidates.register(db, make(tmp_path / "ck", "a", 1))
    again = candidates.register(db, Path(a.path))
    assert again == a and a.phase == "learn" and a.status == candidates.CANDIDATE
    b = candidates.register(db, make(tmp_path / "ck", "b", 2, parents=[a.candidate_id]))
    assert b.parents == (a.candidate_id,)
    assert candidates.get(db, a.candidate_id[:8]) == a
    assert [c.candidate_id for c in candidates.ancestors(db, b.candidate_id)] == [b.candidate_id, a.candidate_id]
    assert candidates.resolve(db, a.short) == (Path(a.path), a)
    assert candidates.resolve(None, a.path)[0] == Path(a.path)
    with pytest.raises(CandidateError, match="unknown candidate"):
        candidates.get(db, "deadbeef00")
    with pytest.raises(CandidateError, match="too short"):
        candidates.get(db, "ab")
    # identical weights published twice are one candidate
    dup = make(tmp_path / "ck2", "a-again", 1)
    assert candidates.register(db, dup).candidate_id == a.candidate_id


def test_same_inputs_find_the_existing_candidate_unless_its_files_are_gone(tmp_path):
    db = tmp_path / "sleep.duckdb"
    a = candidates.register(db, make(tmp_path / "ck", "a", 1))
    assert candidates.find_same_inputs(db, "learn", "dv-1", "r1", []) == a
    assert candidates.find_same_inputs(db, "learn", "dv-2", "r1", []) is None
    assert candidates.find_same_inputs(db, "learn", "dv-1", "r1", ["someparent"]) is None
    (Path(a.path) / "model.safetensors").write_bytes(b"broken")
    assert candidates.find_same_inputs(db, "learn", "dv-1", "r1", []) is None


def _release(db, cand):
    def also(con, version):
        candidates.set_status(con, cand.candidate_id, candidates.RELEASED, version)
    return registry.release(db, Path(cand.path), "dv-1", f"gate-{cand.short}", expected_sha256=cand.candidate_id, also=also)


def test_retention_keeps_releases_leases_and_fresh_candidates(tmp_path):
    """Release v1, then publish keep_last + 2 more candidates that all fail their gate: v1's weights
    survive pruning and rollback to v0001 still works; another process's staging directory is untouched."""
    db, root, keep = tmp_path / "sleep.duckdb", tmp_path / "ck", 2
    v1 = candidates.register(db, make(root, "v1", 0))
    _release(db, v1)
    v2 = candidates.register(db, make(root, "v2", 1))
    _release(db, v2)
    busy = staging_dir(root, "someone-elses-publish")  # this process is alive: the staging dir is in use
    rejected = []
    for i in range(keep + 2):
        c = candidates.register(db, make(root, f"failed{i}", 10 + i))
        candidates.mark(db, c.candidate_id, candidates.REJECTED, "gate failed")
        rejected.append(c)
        candidates.retain(db, root, keep)
    assert Path(v1.path).is_dir() and Path(v2.path).is_dir() and busy.is_dir()
    gone = [c for c in rejected if not Path(c.path).exists()]
    assert [c.candidate_id for c in gone] == [c.candidate_id for c in rejected[:2]]
    assert {candidates.get(db, c.candidate_id).status for c in gone} == {candidates.PRUNED}
    out = subprocess.run([CLI, "release", "rollback", "v0001", "--home", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert registry.live(db).version == "v0001"

    # an ungated candidate waits for its gate; once old it may go; a leased one never while held
    fresh = candidates.register(db, make(root, "fresh", 50))
    held = candidates.register(db, make(root, "held", 51))
    candidates.mark(db, held.candidate_id, candidates.REJECTED, "gate failed")
    age(db, held.candidate_id, 30)
    with candidates.lease(db, held.candidate_id, "test gate"):
        candidates.retain(db, root, 0)
        assert Path(fresh.path).is_dir() and Path(held.path).is_dir()
    candidates.retain(db, root, 0)
    assert not Path(held.path).exists() and Path(fresh.path).is_dir()
    assert Path(v1.path).is_dir() and Path(v2.path).is_dir()


def test_purge_is_explicit_and_never_takes_the_live_release(tmp_path):
    db, root = tmp_path / "sleep.duckdb", tmp_path / "ck"
    v1 = candidates.register(db, make(root, "v1", 0))
    _release(db, v1)
    v2 = candidates.register(db, make(root, "v2", 1))
    _release(db, v2)
    with pytest.raises(CandidateError, match="live release"):
        candidates.purge(db, v2.short, "no longer needed")
    out = subprocess.run([CLI, "candidates", "purge", v1.short, "--reason", "superseded", "--home", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not Path(v1.path).exists() and candidates.get(db, v1.short).status == candidates.PURGED
    listing = subprocess.run([CLI, "candidates", "list", "--home", str(tmp_path)], capture_output=True, text=True).stdout
    assert v1.short in listing and "purged" in listing and v2.short in listing and "released" in listing


def test_a_lease_of_a_dead_process_does_not_hold(tmp_path):
    db, root = tmp_path / "sleep.duckdb", tmp_path / "ck"
    c = candidates.register(db, make(root, "c", 0))
    candidates.mark(db, c.candidate_id, candidates.REJECTED, "gate failed")
    age(db, c.candidate_id, 30)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    with connect(db) as con:
        con.execute("INSERT INTO candidate_leases VALUES ('x', ?, 'crashed gate', ?, ?, ?)",
                    [c.candidate_id, __import__("socket").gethostname(), dead, dt.datetime.now()])
    assert candidates.retain(db, root, 0) == [c.candidate_id]
