"""trained_checkpoint through Dagster: in-process materialisation, live metrics, cancellation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

import definitions
from sleep_pipeline.checkpoint import verify_checkpoint
from tests.conftest import ROOT
from tests.test_train import TINY_MODEL


def _shrink_learn(recipes_dir: Path, **training) -> None:
    recipe = yaml.safe_load((recipes_dir / "learn.yaml").read_text())
    (recipes_dir / "model" / "tiny_test.yaml").write_text(yaml.safe_dump(TINY_MODEL))
    recipe["model"] = {"config": "model/tiny_test.yaml"}
    recipe["tokenizer"]["vocab_size"] = 512
    recipe["training"].update({"max_steps": 8, "eval_steps": 4, "save_steps": 4, "logging_steps": 2,
                               "micro_batch_size": 4, "max_seq_len": 256, **training})
    (recipes_dir / "learn.yaml").write_text(yaml.safe_dump(recipe))


def test_trained_checkpoint_materialises_in_process_with_two_ranks(recipes_dir, storage, capfd):
    _shrink_learn(recipes_dir)
    defs = definitions.build_defs(recipes_dir, storage)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources, instance=instance,
                            selection=dg.AssetSelection.assets("trained_checkpoint").upstream())
    assert result.success
    meta = result.asset_materializations_for_node("trained_checkpoint")[0].metadata
    ckpt = Path(meta["checkpoint"].value)
    manifest = verify_checkpoint(ckpt)
    assert meta["world_size"].value == 2 and meta["engine"].value == "DeepSpeedEngine"
    assert manifest["data_version"] == meta["data_version"].value
    assert meta["validation_loss"].value < meta["initial_validation_loss"].value
    assert "data:image/png;base64," in meta["loss_curve"].value
    # The worker's progress reached the run log through Pipes.
    text = "\n".join(e.user_message for e in instance.all_logs(result.run_id))
    assert "step 8/8" in text and "tokens/s" in text
    # ... and shows in the terminal once per event (through the run log), not once more as the worker's output
    out = capfd.readouterr()
    terminal = (out.out + out.err).splitlines()
    assert len([line for line in terminal if "step 8/8 loss" in line]) == 1


def test_cancelling_the_run_leaves_no_rank_alive(recipes_dir, storage, tmp_path):
    """Ctrl-C / run termination of `dagster asset materialize` must take the launcher and every rank with it."""
    # Rank 0 stays silent (no log lines through Pipes), as a long step or evaluation would be.
    _shrink_learn(recipes_dir, max_steps=5000, save_steps=5000, eval_steps=5000, logging_steps=5000)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dh"), "SLEEP_PIPELINE_HOME": str(storage),
           "SLEEP_PIPELINE_RECIPES": str(recipes_dir)}
    (tmp_path / "dh").mkdir()
    dagster = str(Path(sys.executable).parent / "dagster")
    subprocess.run([dagster, "instance", "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    data = subprocess.run([dagster, "asset", "materialize", "-m", "definitions", "--select", "*tiered_data_mix"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert data.returncode == 0, data.stderr[-2000:]
    proc = subprocess.Popen([dagster, "asset", "materialize", "-m", "definitions", "--select", "trained_checkpoint"],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    pids: list[int] = []
    while time.monotonic() < deadline:
        pid_files = list((storage / "runs").glob("learn-*/pids/rank*.pid")) if (storage / "runs").exists() else []
        if len(pid_files) == 2:
            pids = [int(p.read_text()) for p in pid_files]
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    assert len(pids) == 2, "the ranks never started"
    time.sleep(20)  # into DeepSpeed initialisation / training
    proc.send_signal(signal.SIGINT)  # what Ctrl-C and a run termination deliver
    proc.wait(120)
    time.sleep(2)
    alive = [p for p in pids if _alive(p)]
    assert not alive, f"ranks still running after the run was cancelled: {alive}"


def test_ranks_stop_when_the_launching_process_is_killed_outright(tmp_path, recipes_dir):
    """SIGKILL gives the launching side no chance to clean up; the ranks notice and exit."""
    from resources.deepspeed import free_port

    _shrink_learn(recipes_dir, max_steps=5000, save_steps=5000, eval_steps=5000, logging_steps=5000)
    mix = tmp_path / "mix"
    mix.mkdir()
    rows = [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i)} for i in range(200)]
    for name in ("train", "validation"):
        (mix / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
from resources.deepspeed import DeepSpeedClusterResource
res = DeepSpeedClusterResource()
cmd = res.build_command("sleep_pipeline.train.sft", ["--recipe", {str(recipes_dir / 'learn.yaml')!r}, "--data-dir", {str(mix)!r},
      "--run-dir", {str(run)!r}, "--out-root", {str(tmp_path / 'out')!r}], master_port={free_port()})
subprocess.Popen(cmd, env={{**res.launch_env(), "SLEEP_PIPELINE_WATCH_PID": str(os.getpid())}}, start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(3600)
"""], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while len(list(run.glob("pids/rank*.pid"))) < 2:
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.5)
    pids = [int(p.read_text()) for p in run.glob("pids/rank*.pid")]
    time.sleep(25)  # past start-up: a rank killed while loading a DeepSpeed op would leave its build lock
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(1)
        alive = [p for p in pids if _alive(p)]
    assert not alive, f"ranks outlived their launching process: {alive}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_worker_that_reports_no_checkpoint_fails_the_step_and_its_metrics_are_read_in_order(tmp_path):
    import dagster as dg

    from resources.deepspeed import reported_checkpoint
    from sleep_pipeline.train.runtime import read_metrics

    first = dg.MaterializeResult(metadata={"steps": 4})
    with pytest.raises(dg.Failure, match="the Dream worker finished without reporting a checkpoint"):
        reported_checkpoint([first], "Dream worker")
    done = dg.MaterializeResult(metadata={"checkpoint": dg.MetadataValue.path(str(tmp_path / "ckpt")), "steps": 8})
    reported, checkpoint = reported_checkpoint([first, done], "Learn worker")
    assert checkpoint == tmp_path / "ckpt" and reported["steps"] == 8
    assert read_metrics(tmp_path) == []  # no metrics file yet: an empty curve, not an error
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n\n')
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
