"""The Dagster UI, used as a person uses it: `dagster dev` on the embedded default (tiny steps, thresholds
every model meets), headless Chromium. Expand the lineage and find the whole cycle with its edges, launch
"Materialize all", watch the run succeed, read the model card on gated_release, find the three rhythms
on the automation page, then hot-switch `live` with the release jobs launched from the Launchpad with their
config form. Screenshots go to $SLEEP_PIPELINE_ARTIFACTS (default: the test's tmp dir)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from resources.deepspeed import free_port
from sleep_pipeline import candidates
from sleep_pipeline.release import registry
from tests.conftest import ROOT
from tests.test_week import _recipes

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
NODES = """{ assetNodes { assetKey { path } dependencyKeys { path } } }"""


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _run_status(port: int, run_id: str) -> str:
    q = '{ runOrError(runId: "%s") { ... on Run { status } } }' % run_id
    return _graphql(port, q)["data"]["runOrError"]["status"]


def _wait_run(port: int, run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _run_status(port, run_id)
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} still {status} after {timeout:.0f} s")


@pytest.fixture
def ui(tmp_path):
    """`dagster dev` on a fresh DAGSTER_HOME with the shipped dagster.yaml; its whole process group is
    stopped afterwards."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # CI installs it (.ci/run): a missing browser there is a failure, not a skip
            pytest.fail(f"{CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    recipes = _recipes(tmp_path)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    storage = tmp_path / "storage"
    env = {**os.environ, "DAGSTER_HOME": str(home), "SLEEP_PIPELINE_HOME": str(storage),
           "SLEEP_PIPELINE_RECIPES": str(recipes), "SLEEP_PIPELINE_EXECUTOR": "in_process"}
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "dagster"), "instance", "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
    port = free_port()
    log = open(tmp_path / "dagster_dev.log", "w")
    proc = subprocess.Popen([str(bin_dir / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _graphql(port, NODES).get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dagster dev did not serve the code location within 180 s"
            time.sleep(1)
        artifacts = Path(os.environ.get("SLEEP_PIPELINE_ARTIFACTS") or tmp_path / "screenshots")
        artifacts.mkdir(parents=True, exist_ok=True)
        yield {"port": port, "url": f"http://127.0.0.1:{port}", "storage": storage, "artifacts": artifacts}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(20)
                time.sleep(1)
            except subprocess.TimeoutExpired:
                pass
        log.close()


def _shown(name: str, expected: set[str]) -> str | None:
    """The asset name a (possibly middle-truncated, "compre…_checkpoint") graph label stands for."""
    if "…" not in name:
        return name if name in expected else None
    head, tail = name.split("…", 1)
    hits = [e for e in expected if e.startswith(head) and e.endswith(tail)]
    return hits[0] if len(hits) == 1 else None


def test_a_person_runs_a_cycle_from_the_ui_reads_the_card_and_hot_switches_live(ui):
    from playwright.sync_api import expect, sync_playwright

    url, port, shots = ui["url"], ui["port"], ui["artifacts"]
    nodes = _graphql(port, NODES)["data"]["assetNodes"]
    names = {n["assetKey"]["path"][-1] for n in nodes}
    edges = sum(len(n["dependencyKeys"]) for n in nodes)
    assert {"curated_tasks", "deduped_corpus", "tiered_data_mix", "trained_checkpoint", "compressed_checkpoint",
            "dream_set", "dreamed_checkpoint", "gate_report", "gated_release", "retrieval_index"} <= names
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)

        # 1. the lineage opens collapsed to its groups; expand them all and find every asset and every edge
        page.goto(url + "/asset-groups")
        page.get_by_text("learn_data", exact=True).first.wait_for()
        expect(page.get_by_text("Loading...")).to_have_count(0)
        page.screenshot(path=str(shots / "1-lineage-groups.png"))
        page.mouse.click(1000, 900, button="right")  # the graph's context menu
        page.get_by_role("menuitem", name="Expand all groups").click()
        labels = page.locator("svg foreignObject [class*='AssetNode_assetName']")
        expect(labels).to_have_count(len(names))
        shown = {_shown(t.strip(), names) for t in labels.all_inner_texts()}
        assert shown == names, f"graph shows {sorted(map(str, shown))}, expected {sorted(names)}"
        expect(page.locator('path[stroke="var(--color-lineage-edge)"]')).to_have_count(edges)
        page.screenshot(path=str(shots / "2-lineage-expanded.png"))

        # 2. "Materialize all" launches the whole cycle; the toast links to the run, which succeeds
        page.get_by_role("button", name="Materialize all").click()
        link = page.locator('a[href^="/runs/"]').first
        link.wait_for()
        run_id = link.get_attribute("href").rsplit("/", 1)[-1]
        page.goto(f"{url}/runs/{run_id}")
        assert _wait_run(port, run_id, timeout=900) == "SUCCESS"
        page.reload()
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
        page.screenshot(path=str(shots / "3-run-success.png"))

        # 3. gated_release: the release's metadata and its model card, rendered from Markdown
        page.goto(url + "/assets/gated_release")
        expect(page.locator("tr", has_text="channel").first).to_contain_text("live")
        page.locator("tr", has_text="model_card").first.get_by_text("[Show Markdown]").click()
        card = page.get_by_role("dialog")
        # the body first (the card's title as its first heading), the Hub's front matter as a YAML block
        expect(card.get_by_role("heading", level=1).first).to_contain_text("v0001")
        expect(card.locator("code", has_text="model-index").first).to_be_attached()
        assert card.get_by_role("listitem").filter(has_text="model-index").count() == 0
        expect(card.get_by_role("heading", name="Lineage")).to_be_visible()
        expect(card.get_by_role("heading", name="Metrics")).to_be_visible()
        assert card.locator("table").count() >= 2 and card.locator("td", has_text="capability").count() > 0
        page.screenshot(path=str(shots / "4-model-card.png"))
        page.keyboard.press("Escape")

        # 4. the automation page lists the three rhythms (and the sensors)
        page.goto(url + "/automation")
        for schedule in ("weekly_rhythm", "monthly_rhythm", "daily_rhythm", "canary_promotion", "training_trigger"):
            expect(page.get_by_text(schedule, exact=True)).to_be_visible()
        expect(page.get_by_text("At 05:00 AM UTC", exact=False).first).to_be_visible()
        page.screenshot(path=str(shots / "5-automation.png"))

        # 5. hot switch: a newer release goes live beside the cycle's; the rollback job, launched from the
        #    Launchpad with its config form naming the cycle's version, moves live back to it
        db = ui["storage"] / "sleep.duckdb"
        cycle_release = registry.live(db)
        compress = [c for c in candidates.list_candidates(db) if c.phase == "compress"][0]
        newer = registry.release(db, Path(compress.path), compress.data_version or "?", "manual", notes="a hotfix")
        assert registry.live(db).version == newer.version != cycle_release.version
        page.goto(url + "/locations/definitions/jobs/rollback_release/playground")
        editor = page.locator(".CodeMirror, .cm-editor").first
        editor.click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.keyboard.insert_text(f"ops:\n  rollback_live_release:\n    config:\n      version: {cycle_release.version}\n"
                                  f"      reason: hot switch back to the cycle's release\n")
        expect(page.get_by_text("No errors")).to_be_visible()
        page.screenshot(path=str(shots / "6-launchpad-rollback.png"))
        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url("**/runs/**")
        rollback_run = page.url.split("?")[0].rsplit("/", 1)[-1]
        assert _wait_run(port, rollback_run, timeout=180) == "SUCCESS"
        assert registry.live(db).version == cycle_release.version
        page.reload()
        expect(page.get_by_text(f"live: {newer.version} -> {cycle_release.version}").first).to_be_visible()
        page.screenshot(path=str(shots / "7-rollback-run.png"))
        browser.close()

    # 6. the same hot switch through GraphQL: a canary promoted to live by the promote_canary job
    canary = registry.release(db, Path(compress.path), compress.data_version or "?", "manual", channel="canary")
    launched = _graphql(port, """mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""", {"p": {
        "selector": {"repositoryLocationName": "definitions", "repositoryName": "__repository__",
                     "pipelineName": "promote_canary"},
        "runConfigData": {"ops": {"promote_canary_release": {"config": {"version": canary.version}}}}}})
    result = launched["data"]["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", result
    assert _wait_run(port, result["run"]["runId"], timeout=180) == "SUCCESS"
    assert registry.live(db).version == canary.version and registry.canary(db) is None
