"""The checkpoint contract: atomic publish, verified manifest, no pickles, last N kept."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sleep_pipeline.checkpoint import (
    CheckpointError, latest_checkpoint, list_checkpoints, publish, staging_dir, verify_checkpoint,
)


def _stage(root, name, value=1.0):
    stage = staging_dir(root, name)
    save_file({"w": torch.full((4,), value)}, str(stage / "model.safetensors"))
    (stage / "config.json").write_text(json.dumps({"value": value}))
    return stage


def test_publish_verifies_and_renames(tmp_path):
    final, manifest = publish(_stage(tmp_path, "a"), tmp_path, "a", {"steps": 3})
    assert final == tmp_path / "a" and (final / "manifest.json").exists()
    assert manifest["steps"] == 3 and set(manifest["files"]) == {"model.safetensors", "config.json"}
    assert verify_checkpoint(final)["checkpoint_sha256"] == manifest["checkpoint_sha256"]
    assert not list(tmp_path.glob(".staging-*"))


def test_tampering_and_partial_directories_are_detected(tmp_path):
    final, _ = publish(_stage(tmp_path, "a"), tmp_path, "a", {})
    (final / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(final)
    partial = tmp_path / "b"
    partial.mkdir()
    save_file({"w": torch.zeros(2)}, str(partial / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(partial)
    staged = _stage(tmp_path, "c")  # never published: not listed
    assert list_checkpoints(tmp_path) == [final]
    assert staged.exists()


def test_pickles_are_refused(tmp_path):
    stage = _stage(tmp_path, "p")
    torch.save({"w": torch.zeros(1)}, stage / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        publish(stage, tmp_path, "p", {})
    assert not (tmp_path / "p").exists()


def test_a_checkpoint_that_does_not_reload_is_not_published(tmp_path):
    def reload(_):
        raise OSError("truncated tensor")

    with pytest.raises(CheckpointError, match="does not reload"):
        publish(_stage(tmp_path, "r"), tmp_path, "r", {}, reload=reload)
    assert latest_checkpoint(tmp_path) is None


def test_editing_a_lineage_field_fails_verification(tmp_path):
    final, _ = publish(_stage(tmp_path, "a"), tmp_path, "a", {"data_version": "dv-1", "base_model": "built from config"})
    manifest = json.loads((final / "manifest.json").read_text())
    for field, value in (("data_version", "dv-2"), ("base_model", "/models/other"), ("created_at", "2020-01-01")):
        edited = {**manifest, field: value}
        (final / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(CheckpointError, match="edited"):
            verify_checkpoint(final)
    (final / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint(final)


def test_publishing_deletes_nothing_and_leaves_another_processs_staging_alone(tmp_path):
    import subprocess
    import sys
    import time

    from sleep_pipeline.checkpoint import abandoned_staging

    for i in range(4):
        publish(_stage(tmp_path, f"c{i}", i), tmp_path, f"c{i}", {})
        time.sleep(0.01)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["c0", "c1", "c2", "c3"]
    assert latest_checkpoint(tmp_path).name == "c3"
    # a staging directory of this (live) process is in use; one of a process that has exited is abandoned
    mine = _stage(tmp_path, "busy")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / mine.name.replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-")
    gone.mkdir()
    assert abandoned_staging(tmp_path) == [gone]
    publish(_stage(tmp_path, "c4", 4), tmp_path, "c4", {})
    assert mine.exists() and gone.exists()  # publish itself never deletes anything


def test_atomic_replacement_keeps_the_old_file_when_writing_fails(tmp_path):
    from sleep_pipeline.fsio import replacing, write_atomic

    target = tmp_path / "state" / "run_state.json"
    write_atomic(target, '{"step": 1}')
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text('{"step": 2, "half')
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"step": 1}'
    assert [p.name for p in target.parent.iterdir()] == ["run_state.json"]  # no temporary file left
    write_atomic(target, "ünïcode")
    assert target.read_text(encoding="utf-8") == "ünïcode"


def test_atomic_writers_in_threads_never_see_each_others_halves(tmp_path):
    import threading

    from sleep_pipeline.fsio import write_atomic

    target, errors = tmp_path / "card.md", []

    def writer(n: int) -> None:
        try:
            for _ in range(40):
                write_atomic(target, str(n) * 5000)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    text = target.read_text()
    assert len(set(text)) == 1 and len(text) == 5000  # one writer's whole file
    assert [p.name for p in tmp_path.iterdir()] == ["card.md"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
