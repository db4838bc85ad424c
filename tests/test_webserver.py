"""The Dagster UI really serves the code location: sources show up upstream of deduped_corpus."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from resources.deepspeed import free_port
from tests.conftest import ROOT

QUERY = """{ assetNodes { assetKey { path } groupName dependencyKeys { path }
             assetChecksOrError { ... on AssetChecks { checks { name blocking } } } } }"""


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_ui_shows_each_source_upstream_of_the_corpus(recipes_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dh"), "SLEEP_PIPELINE_HOME": str(tmp_path / "storage"),
           "SLEEP_PIPELINE_RECIPES": str(recipes_dir)}
    (tmp_path / "dh").mkdir()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        data = None
        while time.monotonic() < deadline:
            try:
                data = _graphql(port, QUERY)
                if data.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"webserver exited: {proc.stderr.read()[-2000:]}")
            time.sleep(1)
        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    finally:
        proc.terminate()
        proc.wait(30)
    sources = {k for k, n in nodes.items() if n["groupName"] == "sources"}
    assert sources == {"raw/curated_tasks", "raw/tool_calls", "raw/safety_prompts", "raw/general_helpful",
                       "raw/structured_output", "raw/long_context", "raw/forum_reposts"}
    assert {"/".join(d["path"]) for d in nodes["deduped_corpus"]["dependencyKeys"]} == sources
    assert {"/".join(d["path"]) for d in nodes["tiered_data_mix"]["dependencyKeys"]} == {"deduped_corpus"}
    checks = {c["name"]: c["blocking"] for c in nodes["tiered_data_mix"]["assetChecksOrError"]["checks"]}
    assert checks == {"mix_not_empty": True, "bucket_ratios_within_tolerance": True}
