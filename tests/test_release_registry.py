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
    final, manifest = publish(stage, root, name, {"kind": "test"})
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
    # a second rollback undoes the first (v0002 was live before v0001 went live again) ...
    out = subprocess.run([cli, "release", "rollback", "--home", str(home)], capture_output=True, text=True, check=True).stdout
    assert "v0001 -> v0002" in out
    # ... unless v0002 is revoked: then there is nothing usable before v0001
    subprocess.run([cli, "release", "revoke", "v0002", "--reason", "bad", "--home", str(home)], check=True, capture_output=True)
    failed = subprocess.run([cli, "release", "rollback", "--home", str(home)], capture_output=True, text=True)
    assert failed.returncode == 2 and "first usable release" in failed.stderr

    defs = definitions.build_defs(storage_dir=home)
    registry.release(db, make_checkpoint(tmp_path / "ck", "c")[0], "dv-3", "gate-3")
    result = defs.resolve_job_def("rollback_release").execute_in_process(
        run_config={"ops": {"rollback_live_release": {"config": {"version": "v0001", "reason": "hot switch"}}}},
        instance=dg.DagsterInstance.ephemeral())
    assert result.success and registry.live(db).version == "v0001"


def test_rollback_returns_to_the_release_live_before_and_skips_revoked_ones(tmp_path):
    """v1 live; v2 released and rolled back (bad); v3 released; a plain rollback goes to v1 (live before
    v3), never to v2 — and once v2 is revoked it can never go live again."""
    db = tmp_path / "sleep.duckdb"
    v = [registry.release(db, make_checkpoint(tmp_path / "ck", f"c{i}")[0], "dv", f"gate-{i}").version for i in range(2)]
    assert registry.rollback(db).version == v[0]
    v3 = registry.release(db, make_checkpoint(tmp_path / "ck", "c3")[0], "dv", "gate-3").version
    assert registry.rollback(db).version == v[0]  # not v0002 (seq - 1), which was rolled away from
    registry.rollback(db, v3)
    revoked, live_after = registry.revoke(db, v[1], "answers benign requests with refusals")
    assert revoked.revoked and live_after.version == v3
    with pytest.raises(ReleaseError, match="revoked"):
        registry.rollback(db, v[1])
    # revoking the live release switches back to the one live before it, skipping revoked ones
    revoked, live_after = registry.revoke(db, v3, "privacy leak found")
    assert live_after.version == v[0]
    with pytest.raises(ReleaseError, match="no earlier one|first usable"):
        registry.rollback(db)
    assert [r.version for r in registry.list_releases(db) if r.revoked] == [v[1], v3]


def test_revoke_from_the_cli_and_release_commands_ignore_broken_data_recipes(tmp_path):
    home = tmp_path / "home"
    db = home / "sleep.duckdb"
    for i in range(2):
        registry.release(db, make_checkpoint(tmp_path / "ck", f"c{i}")[0], "dv", f"gate-{i}")
    broken = tmp_path / "recipes"
    broken.mkdir()
    (broken / "sources.yaml").write_text("sources: [{name: x, path: /nope, format: jsonl, tier: 9}]\n")
    (broken / "data.yaml").write_text("mix: {")
    env = {**__import__("os").environ, "SLEEP_PIPELINE_RECIPES": str(broken), "SLEEP_PIPELINE_HOME": str(home)}
    cli = str(Path(sys.executable).parent / "sleep-pipeline")
    run = lambda *a: subprocess.run([cli, "release", *a], capture_output=True, text=True, env=env)  # noqa: E731
    out = run("revoke", "v0002", "--reason", "bad answers")
    assert out.returncode == 0 and "live: v0002 -> v0001" in out.stdout, out.stderr
    listing = run("list")
    assert listing.returncode == 0 and "REVOKED: bad answers" in listing.stdout and "* v0001" in listing.stdout
    assert run("rollback").returncode == 2  # nothing usable before v0001: a clear refusal, not a crash


def test_the_callers_bookkeeping_is_part_of_the_release_transaction(tmp_path):
    db = tmp_path / "sleep.duckdb"
    a, sha = make_checkpoint(tmp_path / "ck", "a")

    def crash(con, version):
        raise OSError("disk full while marking the report")

    with pytest.raises(OSError):
        registry.release(db, a, "dv", "gate-1", expected_sha256=sha, also=crash)
    assert registry.live(db) is None and registry.list_releases(db) == [] and registry.events(db) == []
