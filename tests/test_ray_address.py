"""Data hygiene on a Ray cluster that runs on its own (``ray start --head``), reached by address with
its token, as a deployment would point the ray_cluster resource at one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from resources.deepspeed import free_port
from sleep_pipeline.config import load_data_recipe
from sleep_pipeline.data.corpus import RayOptions, build_deduped_corpus, ingest_source
from tests.conftest import RECIPES

RAY = Path(sys.executable).with_name("ray")
SCRIPT = """\
import dataclasses, json, sys
from sleep_pipeline.config import load_data_recipe
from sleep_pipeline.data.corpus import RayOptions, build_deduped_corpus
recipe = load_data_recipe(sys.argv[1], sys.argv[2])
recipe = dataclasses.replace(recipe, sources=recipe.sources[:2], backend="ray")
s = build_deduped_corpus(recipe, sys.argv[3], "run", ray=RayOptions(address=sys.argv[4], partition_rows=1000))
print(json.dumps({"kept": s.kept, "per_source": s.per_source, "version": s.corpus_version,
                  "backend": s.dedup_stats["backend"]}))
"""


@pytest.fixture(scope="module")
def head_node():
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay short
    token = subprocess.run([str(RAY), "get-auth-token", "--generate"], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    proc = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    out = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        out.append(line)
        if "Ray runtime started" in line:
            break
        if proc.poll() is not None:
            pytest.fail("ray start failed:\n" + "".join(out))
    yield address, token
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_a_cluster_by_address_gives_the_local_answer(head_node, tmp_path, generated_sources):
    """The step's process reaches the cluster with RAY_AUTH_MODE=token and the cluster's token in its
    environment (Ray never sends a token to an explicit address otherwise)."""
    recipe = load_data_recipe(RECIPES, generated_sources)
    recipe = dataclasses.replace(recipe, sources=recipe.sources[:2])
    local_db, ray_db = tmp_path / "local.duckdb", tmp_path / "ray.duckdb"
    for src in recipe.sources:
        ingest_source(src, recipe, local_db, "ingest")
    shutil.copy(local_db, ray_db)
    local = build_deduped_corpus(recipe, local_db, "run")
    address, token = head_node
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(RECIPES), str(generated_sources), str(ray_db), address],
                          capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote == {"kept": local.kept, "per_source": local.per_source, "version": local.corpus_version,
                      "backend": "ray"}


def test_a_cluster_reached_without_its_token_is_a_clear_error(head_node, tmp_path, generated_sources):
    recipe = load_data_recipe(RECIPES, generated_sources)
    db = tmp_path / "db.duckdb"
    for src in recipe.sources[:2]:
        ingest_source(src, recipe, db, "ingest")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_gcs_server_port_wait_time_s"] = "2"  # Ray's connection retries (20 s by default)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(RECIPES), str(generated_sources), str(db), head_node[0]],
                          capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode != 0
    assert f"cannot connect to the Ray cluster at '{head_node[0]}'" in proc.stderr and "RAY_AUTH_MODE=token" in proc.stderr
