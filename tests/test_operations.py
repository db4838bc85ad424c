"""Operations: the shipped dagster.yaml's run monitoring, slot release and run queue, Dagster's own daemon code
driven against an instance loaded from it; retries on I/O-bound steps; the training steps' maximum runtime."""

import datetime as dt
import logging
import threading
import time
import types
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.test_utils import create_run_for_test
from dagster._daemon.monitoring import concurrency as slot_monitor
from dagster._daemon.monitoring import run_monitoring
from dagster._utils.tags import TagConcurrencyLimitsCounter

import definitions
from resources.deepspeed import DeepSpeedClusterResource
from sleep_pipeline.rhythms import MAX_RUNTIME_TAG, RHYTHM_TAG
from tests.conftest import ROOT
from tests.test_learn_asset import _alive, _shrink_learn
from tests.test_rhythms import _tick

LOG = logging.getLogger("test_operations")


@pytest.fixture
def shipped_instance():
    with dg.instance_for_test(overrides=yaml.safe_load((ROOT / "dagster.yaml").read_text())) as instance:
        yield instance


def _started_run(instance, tags=None):
    run = create_run_for_test(instance, job_name="sleep_cycle", tags=tags or {})
    instance.report_dagster_event(DagsterEvent(event_type_value=DagsterEventType.RUN_START.value,
                                               job_name="sleep_cycle"), run_id=run.run_id)
    record = instance.get_run_record_by_id(run.run_id)
    assert record.dagster_run.status == dg.DagsterRunStatus.STARTED
    return record


def _monitor_at(instance, record, monkeypatch, seconds_after_start: float) -> dg.DagsterRunStatus:
    monkeypatch.setattr(run_monitoring, "get_current_timestamp", lambda: record.start_time + seconds_after_start)
    run_monitoring.monitor_started_run(instance, None, record, LOG)
    return instance.get_run_by_id(record.dagster_run.run_id).status


def test_run_monitoring_fails_a_run_stuck_in_started(shipped_instance, monkeypatch):
    """A run worker that hung (or died without reporting) leaves its run STARTED and, with the accelerator
    limit, blocks every later model run: the shipped instance fails it after 48 hours."""
    assert shipped_instance.run_monitoring_enabled
    limit = shipped_instance.run_monitoring_max_runtime_seconds
    assert limit == 48 * 3600
    record = _started_run(shipped_instance)
    assert _monitor_at(shipped_instance, record, monkeypatch, limit - 60) == dg.DagsterRunStatus.STARTED
    assert _monitor_at(shipped_instance, record, monkeypatch, limit + 60) == dg.DagsterRunStatus.FAILURE
    messages = [e.message for e in shipped_instance.all_logs(record.dagster_run.run_id)]
    assert any("exceeding maximum runtime of 172800 seconds" in (m or "") for m in messages), messages


def test_each_rhythm_bounds_its_runs(shipped_instance, monkeypatch, recipes_dir, storage):
    """The nightly dream must be done before the 05:00 gate: a daily run is failed after its 2 hours."""
    defs = definitions.build_defs(recipes_dir, storage)
    nightly = _tick(defs, "daily_rhythm", dt.datetime(2026, 12, 7, 3, tzinfo=dt.timezone.utc))
    monday = _tick(defs, "weekly_rhythm", dt.datetime(2026, 12, 7, 1, tzinfo=dt.timezone.utc))
    assert nightly.tags[MAX_RUNTIME_TAG] == str(2 * 3600) and monday.tags[MAX_RUNTIME_TAG] == str(40 * 3600)
    record = _started_run(shipped_instance, nightly.tags)
    assert _monitor_at(shipped_instance, record, monkeypatch, 2 * 3600 - 60) == dg.DagsterRunStatus.STARTED
    assert _monitor_at(shipped_instance, record, monkeypatch, 2 * 3600 + 60) == dg.DagsterRunStatus.FAILURE


def test_a_cancelled_run_gives_its_release_slot_back(shipped_instance, monkeypatch):
    """A run cancelled (or crashed) while it held the release pool's one slot must not hold it for ever: the
    daemon frees it free_slots_after_run_end_seconds after the run ended, and the next release step gets it."""
    from assets.gate import RELEASE_POOL

    storage = shipped_instance.event_log_storage
    assert storage.supports_global_concurrency_limits
    storage.set_concurrency_slots(RELEASE_POOL, 1)
    held = create_run_for_test(shipped_instance, job_name="sleep_cycle")
    waiting = create_run_for_test(shipped_instance, job_name="sleep_cycle")
    assert storage.claim_concurrency_slot(RELEASE_POOL, held.run_id, "gated_release").is_claimed
    assert not storage.claim_concurrency_slot(RELEASE_POOL, waiting.run_id, "gated_release").is_claimed
    shipped_instance.report_run_canceled(held)
    ended = shipped_instance.get_run_record_by_id(held.run_id).end_time
    context = types.SimpleNamespace(instance=shipped_instance)

    def sweep(after: float) -> None:
        monkeypatch.setattr(slot_monitor, "get_current_datetime",
                            lambda: dt.datetime.fromtimestamp(ended + after, tz=dt.timezone.utc))
        list(slot_monitor.execute_concurrency_slots_iteration(context, LOG))

    sweep(60)  # within the grace period: the slot stays with the cancelled run
    assert not storage.claim_concurrency_slot(RELEASE_POOL, waiting.run_id, "gated_release").is_claimed
    sweep(180)
    assert storage.claim_concurrency_slot(RELEASE_POOL, waiting.run_id, "gated_release").is_claimed


def test_one_run_per_rhythm_even_where_several_model_runs_are_allowed(recipes_dir, storage):
    """A cluster that trains two models at once raises the accelerator limit; the same rhythm's next slot
    still waits for its previous one (its phases build on each other), another rhythm's does not."""
    overrides = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    for limit in overrides["concurrency"]["runs"]["tag_concurrency_limits"]:
        if limit["key"] == "sleep_pipeline/accelerator":
            limit["limit"] = 2
    defs = definitions.build_defs(recipes_dir, storage)
    job = defs.resolve_job_def("sleep_cycle")
    utc = dt.timezone.utc
    with dg.instance_for_test(overrides=overrides) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
        monday, wednesday, night = (_tick(defs, s, dt.datetime(2026, 12, d, h, tzinfo=utc)) for s, d, h in
                                    (("weekly_rhythm", 7, 1), ("weekly_rhythm", 9, 1), ("daily_rhythm", 9, 3)))
        runs = [instance.create_run_for_job(job, tags=r.tags, asset_selection=frozenset(r.asset_selection))
                for r in (monday, wednesday, night)]
        assert runs[1].tags[RHYTHM_TAG] == "weekly" and runs[2].tags[RHYTHM_TAG] == "daily"
        counter = TagConcurrencyLimitsCounter(limits, [runs[0]])
        assert counter.is_blocked(runs[1]) and not counter.is_blocked(runs[2])


def test_an_io_step_is_retried_past_a_transient_failure(recipes_dir, storage):
    """A source on a network share that is remounting: the first read fails, the step is retried after a
    back-off and materialises; a wrong config fails at once, without retries."""
    sources = yaml.safe_load((recipes_dir / "sources.yaml").read_text())
    for src in sources["sources"]:
        if src["name"] == "curated_tasks":
            del src["generator"]  # a source of the user's own, not regenerated when missing
    (recipes_dir / "sources.yaml").write_text(yaml.safe_dump(sources))
    defs = definitions.build_defs(recipes_dir, storage)
    path = storage / "sources" / "curated_tasks.jsonl"
    assert path.exists()
    away = path.with_suffix(".away")
    path.rename(away)
    threading.Timer(1.0, lambda: away.rename(path)).start()  # back one second later, before the retry
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(defs.assets, resources=defs.resources, instance=instance,
                            selection=dg.AssetSelection.assets(dg.AssetKey(["raw", "curated_tasks"])))
    assert result.success
    retries = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 1
    error, chain = retries[0].event_specific_data.error, []
    while error is not None:
        chain.append(error.to_string())
        error = error.cause or error.context
    assert "curated_tasks.jsonl does not exist" in "".join(chain)

    config = {"ops": {"gated_release": {"config": {"channel": "production"}}}}
    result = dg.materialize([*defs.assets], resources=defs.resources, instance=instance, run_config=config,
                            selection=dg.AssetSelection.assets("gated_release"), raise_on_error=False)
    assert not result.success
    assert not [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]


def test_a_training_step_past_its_maximum_runtime_is_stopped_with_its_ranks(recipes_dir, storage):
    """A training launch that runs past deepspeed.max_runtime_s is terminated, launcher and ranks, and the
    step fails saying so (no retry: launching it again resumes from its last checkpoint)."""
    _shrink_learn(recipes_dir, max_steps=5000, save_steps=5000, eval_steps=5000, logging_steps=5000)
    defs = definitions.build_defs(recipes_dir, storage)
    instance = dg.DagsterInstance.ephemeral()
    data = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources, instance=instance,
                          selection=dg.AssetSelection.assets("tiered_data_mix").upstream())
    assert data.success
    limit = 45.0
    resources = {**defs.resources, "deepspeed": DeepSpeedClusterResource(max_runtime_s=limit, grace_period_s=5)}
    start = time.monotonic()
    result = dg.materialize([*defs.assets], resources=resources, instance=instance, raise_on_error=False,
                            selection=dg.AssetSelection.assets("trained_checkpoint"))
    took = time.monotonic() - start
    assert not result.success
    failure = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE][0]
    assert "exceeded its maximum runtime of 45 s" in failure.event_specific_data.error.message
    assert limit <= took < limit + 40
    pids = [int(p.read_text()) for p in (storage / "runs").glob("learn-*/pids/rank*.pid")]
    assert len(pids) == 2 and not [p for p in pids if _alive(p)]
    assert not [e for e in result.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
