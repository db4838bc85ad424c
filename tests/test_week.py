"""A simulated week of the weekly rhythm on the embedded default, run in order in process with tiny steps:
each schedule tick's run request executes as the daemon would launch it, Learn -> Compress -> Dream ->
Gate -> canary -> stable under one cycle id; the weekend refreshes only the retrieval index; then the
daily rhythm's 03:00 dream from the live release and a failing 05:00 quick gate, which ends its run
successfully as a rejection and leaves yesterday's release live -- or, with a regression alarm open on
it, rolls live back to the release before it."""

import datetime as dt
from pathlib import Path

import dagster as dg
import yaml

import definitions
from sleep_pipeline import candidates
from sleep_pipeline.gate import run as gate
from sleep_pipeline.release import registry
from sleep_pipeline.rhythms import CYCLE_TAG, DECISION_TAG
from tests.conftest import copy_recipes, gate_raw
from tests.gate_helpers import gate_recipe, trivial_thresholds
from tests.test_learn_asset import _shrink_learn

UTC = dt.timezone.utc


def _meta(result, asset: str) -> dict:
    mats = result.asset_materializations_for_node(asset)
    assert mats, f"{asset} was not materialised"
    return {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}


def _recipes(tmp):
    d = copy_recipes(tmp / "recipes")
    _shrink_learn(d, max_steps=8, eval_steps=8, save_steps=8)
    # the weekly gate's thresholds every model meets (the plumbing is the subject); the daily quick gate
    # keeps the shipped nightly thresholds, which an 8-step model fails
    gate_recipe(d, trivial_thresholds(), examples=8, nightly=gate_raw()["thresholds"]["nightly"],
                noise={"z": 1000.0}, forgetting={"risk": 1.0, "hard_limit": 1.0})
    dream = yaml.safe_load((d / "dream.yaml").read_text())
    dream["auto_approve"] = True  # no person reviews the test's dream batches
    (d / "dream.yaml").write_text(yaml.safe_dump(dream))
    rhythms = yaml.safe_load((d / "rhythms.yaml").read_text())
    rhythms["rhythms"]["weekly"]["soak_hours"] = 0  # the soak has passed as soon as the canary is out
    (d / "rhythms.yaml").write_text(yaml.safe_dump(rhythms))
    memory = yaml.safe_load((d / "memory.yaml").read_text())
    memory["questions"]["count"] = 12
    (d / "memory.yaml").write_text(yaml.safe_dump(memory))
    return d


def test_a_week_of_the_weekly_rhythm_then_a_failing_daily_quick_gate(tmp_path, storage):
    defs = definitions.build_defs(_recipes(tmp_path), storage)
    job = defs.resolve_job_def("sleep_cycle")
    instance = dg.DagsterInstance.ephemeral()
    db = storage / "sleep.duckdb"

    def tick(schedule: str, when: dt.datetime):
        data = defs.get_schedule_def(schedule).evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when))
        (req,) = data.run_requests
        result = job.execute_in_process(instance=instance, asset_selection=list(req.asset_selection), tags=req.tags,
                                        raise_on_error=False)
        assert result.success, f"{schedule} at {when}: the run failed"
        return result

    runs = {}
    for name, when in (("mon", dt.datetime(2026, 12, 7, 1, tzinfo=UTC)), ("wed", dt.datetime(2026, 12, 9, 1, tzinfo=UTC)),
                       ("thu", dt.datetime(2026, 12, 10, 1, tzinfo=UTC)), ("fri", dt.datetime(2026, 12, 11, 9, tzinfo=UTC)),
                       ("fri_evening", dt.datetime(2026, 12, 11, 18, tzinfo=UTC))):
        runs[name] = tick("weekly_rhythm", when)
        assert runs[name].dagster_run.tags[CYCLE_TAG] == "weekly-2026-W50"

    # Monday ran data hygiene and Learn only, its blocking data checks included
    mon = runs["mon"]
    assert {e.check_name for e in mon.get_asset_check_evaluations()} >= {"mix_not_empty", "records_accounted_for"}
    assert not mon.asset_materializations_for_node("compressed_checkpoint")
    learn = _meta(mon, "trained_checkpoint")
    # each later phase took the candidate the phase before it recorded in the same cycle, days later
    compressed = _meta(runs["wed"], "compressed_checkpoint")
    assert compressed["parent_candidate_id"] == learn["candidate_id"]
    dreamed = _meta(runs["thu"], "dreamed_checkpoint")
    assert dreamed["dream_parent"] == compressed["candidate_id"] and dreamed["trained"] is True
    report = _meta(runs["fri"], "gate_report")
    assert report["candidate_id"] == dreamed["candidate_id"] and report["gate_rhythm"] == "weekly"
    assert instance.get_run_by_id(runs["fri"].run_id).tags[DECISION_TAG] == "passed"
    for name, asset in (("mon", "trained_checkpoint"), ("wed", "compressed_checkpoint"), ("thu", "dreamed_checkpoint"),
                        ("fri", "gate_report"), ("fri_evening", "gated_release")):
        assert _meta(runs[name], asset)["cycle_id"] == "weekly-2026-W50"

    # Friday evening: the canary channel, not live
    release = _meta(runs["fri_evening"], "gated_release")
    assert release["channel"] == "canary" and release["candidate_id"] == dreamed["candidate_id"]
    # which Learn fed this release: the lineage the UI shows on it
    assert release["lineage"].startswith(f"dream `{dreamed['candidate_id'][:12]}`")
    assert f"learn `{learn['candidate_id'][:12]}`" in release["lineage"]
    assert registry.live(db) is None
    canary, _ = registry.canary(db)
    assert (canary.version, canary.cycle_id, canary.cadence) == (release["version"], "weekly-2026-W50", "weekly")

    # the soak passed with no alarm: the promotion sensor promotes it to stable
    sensor = defs.get_sensor_def("canary_promotion")
    data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, resources=defs.resources))
    (req,) = data.run_requests
    assert req.run_key == f"promote-{canary.version}"
    assert defs.resolve_job_def("promote_canary").execute_in_process(instance=instance, run_config=req.run_config).success
    assert registry.live(db).version == canary.version and registry.canary(db) is None

    # the weekend: only the retrieval index, weights untouched; the live release reads the passages
    before = [c.candidate_id for c in candidates.list_candidates(db)]
    sat = tick("weekly_rhythm", dt.datetime(2026, 12, 12, 3, tzinfo=UTC))
    assert [str(k.to_user_string()) for k in sat.dagster_run.asset_selection] == ["retrieval_index"]
    index = _meta(sat, "retrieval_index")
    assert index["as_of"] == "2026-12-12" and index["live_release"] == canary.version
    assert index["accepted"] > 0 and index["recall_at_k"] > 0.5 and isinstance(index["answer_accuracy"], float)
    assert index["rejected"]["stale"] > 0 and index["rejected"]["superseded"] > 0
    assert [c.candidate_id for c in candidates.list_candidates(db)] == before

    # yesterday's daily release (the week's Learn candidate, released as a passing 05:00 gate would have)
    yesterday = registry.release(db, Path(learn["candidate_path"]), learn["data_version"], "yesterday", cadence="daily")
    # the daily rhythm: 03:00 a small LoRA-only dream from the live release ...
    dream = tick("daily_rhythm", dt.datetime(2026, 12, 15, 3, tzinfo=UTC))
    daily = _meta(dream, "dreamed_checkpoint")
    assert daily["dream_parent"] == yesterday.checkpoint_sha256 and daily["cycle_id"] == "daily-2026-12-15"
    assert not dream.asset_materializations_for_node("red_team_library")
    # ... and at 05:00 the quick gate rejects it: the run succeeds, says so, and yesterday's release stays live
    quick = tick("daily_rhythm", dt.datetime(2026, 12, 15, 5, tzinfo=UTC))
    rejected = _meta(quick, "gate_report")
    assert rejected["candidate_id"] == daily["candidate_id"] and rejected["decision"] != "deploy"
    assert rejected["gate_rhythm"] == "nightly" and not gate.get_report(db, rejected["report_id"]).passed
    assert not quick.asset_materializations_for_node("gated_release")
    assert instance.get_run_by_id(quick.run_id).tags[DECISION_TAG] == "rejected"
    assert registry.live(db).version == yesterday.version
    assert {e.check_name: e.passed for e in quick.get_asset_check_evaluations()}["safety_gate"] is False
    # with a regression alarm open on yesterday's release, a rejection rolls live back to the release before it
    registry.raise_alarm(db, yesterday.version, "complaints about wrong answers", source="monitoring")
    again = tick("daily_rhythm", dt.datetime(2026, 12, 15, 5, tzinfo=UTC))
    assert registry.live(db).version == canary.version
    assert instance.get_run_by_id(again.run_id).tags[DECISION_TAG] == f"rejected, rolled back to {canary.version}"
