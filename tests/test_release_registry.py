"""The release registry: one live pointer, moved only by verified releases and rollbacks."""

import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
from safetensors.torch import save_file

import definitions
from sleep_pipeline.checkpoint import publish, staging_dir
from sleep_pipeline.release import registry
from sleep_pipeline.release.registry import ReleaseError
from sleep_pipeline.store import connect

CTX = mp.get_context("spawn")


def make_checkpoint(root: Path, name: str) -> tuple[Path, str]:
    stage = staging_dir(root, name)
    save_file({"w": torch.randn(8)}, str(stage / "model.safetensors"))
    final, manifest = publish(stage, root, name, {"kind": "test"}, keep_last=1000)
    return final, manifest["checkpoint_sha256"]


def test_release_moves_live_and_rollback_restores_the_previous(tmp_path):
    db = tmp_path / "sleep.duckdb"
    a, sha_a = make_checkpoint(tmp_path / "ck", "a")
    b, sha_b = make_checkpoint(tmp_path / "ck", "b")
    assert registry.live(db) is None
    r1 = registry.release(db, a, "dv-1", "gate-1", expected_sha256=sha_a)
    r2 = registry.release(db, b, "dv-2", "gate-2", expected_sha256=sha_b)
    assert (r1.version, r2.version) == ("v0001", "v0002")
    assert registry.live(db).version == "v0002"
    back = registry.rollback(db)
    assert back.version == "v0001" and registry.live(db).checkpoint_path == str(a)
    registry.rollback(db, "v0002", reason="fixed")
    assert registry.live(db).version == "v0002"
    assert [e[1] for e in registry.events(db)] == ["release", "release", "rollback", "rollback"]


def test_a_rejected_candidate_never_moves_live(tmp_path):
    db = tmp_path / "sleep.duckdb"
    a, _ = make_checkpoint(tmp_path / "ck", "a")
    registry.release(db, a, "dv-1", "gate-1")
    registry.record_rejection(db, "candidate-x", "safety: jailbreak trigger rate 0.4 > 0.1")
    assert registry.live(db).version == "v0001"
    assert registry.events(db)[-1][1:] == ("rejected", "v0001", "candidate-x", "safety: jailbreak trigger rate 0.4 > 0.1")


def test_a_changed_or_broken_checkpoint_cannot_become_live(tmp_path):
    db = tmp_path / "sleep.duckdb"
    a, sha_a = make_checkpoint(tmp_path / "ck", "a")
    b, _ = make_checkpoint(tmp_path / "ck", "b")
    with pytest.raises(ReleaseError, match="changed since it was gated"):
        registry.release(db, b, "dv", "gate", expected_sha256=sha_a)
    registry.release(db, a, "dv", "gate")
    registry.release(db, b, "dv", "gate")
    save_file({"w": torch.zeros(8)}, str(a / "model.safetensors"))  # tampered after release
    with pytest.raises(ReleaseError, match="sha256"):
        registry.rollback(db)
    assert registry.live(db).version == "v0002"
    with pytest.raises(ReleaseError, match="unknown release"):
        registry.rollback(db, "v0099")


def _release_many(db, ckpts, barrier):
    barrier.wait()
    for c in ckpts:
        registry.release(Path(db), Path(c), "dv", "gate")


def test_two_processes_releasing_at_once_keep_one_consistent_pointer(tmp_path):
    db = tmp_path / "sleep.duckdb"
    ckpts = [str(make_checkpoint(tmp_path / "ck", f"c{i}")[0]) for i in range(10)]
    barrier = CTX.Barrier(2)
    procs = [CTX.Process(target=_release_many, args=(str(db), ckpts[i::2], barrier)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = registry.list_releases(db)
    assert [r.seq for r in rows] == list(range(1, 11)) and len({r.version for r in rows}) == 10
    assert sorted(r.checkpoint_path for r in rows) == sorted(str(Path(c).resolve()) for c in ckpts)
    with connect(db) as con:
        assert con.execute("SELECT count(*) FROM release_pointer").fetchone()[0] == 1
    last_event = registry.events(db)[-1]
    assert registry.live(db).version == last_event[3] == "v0010"


def test_cli_and_dagster_job_roll_back(tmp_path):
    home = tmp_path / "home"
    db = home / "sleep.duckdb"
    a, _ = make_checkpoint(tmp_path / "ck", "a")
    b, _ = make_checkpoint(tmp_path / "ck", "b")
    registry.release(db, a, "dv-1", "gate-1")
    registry.release(db, b, "dv-2", "gate-2")
    cli = str(Path(sys.executable).parent / "sleep-pipeline")
    out = subprocess.run([cli, "release", "list", "--home", str(home)], capture_output=True, text=True, check=True).stdout
    assert "* v0002" in out and "  v0001" in out
    out = subprocess.run([cli, "release", "rollback", "--home", str(home)], capture_output=True, text=True, check=True).stdout
    assert "v0002 -> v0001" in out
    failed = subprocess.run([cli, "release", "rollback", "--home", str(home)], capture_output=True, text=True)
    assert failed.returncode == 2 and "first release" in failed.stderr

    defs = definitions.build_defs(storage_dir=home)
    result = defs.resolve_job_def("rollback_release").execute_in_process(
        run_config={"ops": {"rollback_live_release": {"config": {"version": "v0002", "reason": "hot switch"}}}},
        instance=dg.DagsterInstance.ephemeral())
    assert result.success and registry.live(db).version == "v0002"
