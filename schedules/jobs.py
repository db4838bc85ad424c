"""Jobs, schedules and sensors of the sleep cycle.

``sleep_cycle`` materialises every asset: one whole cycle in one run (the README's main command, and the
training trigger's early cycle). The rhythms (``recipes/rhythms.yaml``) run it one phase at a time: one
schedule per rhythm fires at each of its slots and requests only that slot's phases (an asset selection
of ``sleep_cycle``), tagged with the cycle id, the rhythm and the phases, so Monday's Learn, Thursday's
Dream and Friday's Gate of one week are one cycle. Every run of ``sleep_cycle`` carries the accelerator
tag, which the shipped ``dagster.yaml`` limits to one run at a time: overlapping rhythms queue.

Sensors: ``canary_promotion`` promotes a canary after its rhythm's soak period when no regression alarm
was raised on it; ``training_trigger`` starts a whole cycle early (new data, a stale Learn, an alarm).
All start stopped; turn them on in the UI (Automation) or with ``dagster schedule|sensor start``.
"""

from __future__ import annotations

import datetime as dt
import json
from zoneinfo import ZoneInfo

import dagster as dg

from assets.release import promote_canary
from resources.storage import DataRecipeResource, RhythmsResource, StorageResource
from sleep_pipeline import trigger as training
from sleep_pipeline.release import registry
from sleep_pipeline.rhythms import (ACCELERATOR_TAG, AS_OF_TAG, CYCLE_TAG, PHASE_TAG, RHYTHM_TAG, Rhythm, Rhythms,
                                    max_runtime_tags)

TRIGGER_TAG = "sleep_pipeline/trigger"
MODEL_RUN = {ACCELERATOR_TAG: "model"}  # dagster.yaml: one such run at a time

# The main job: everything defined so far, checks included (blocking checks stop downstream steps).
sleep_cycle_job = dg.define_asset_job(
    "sleep_cycle",
    selection=dg.AssetSelection.all(),
    run_tags=MODEL_RUN,
    description="One sleep cycle: data hygiene and the data mix, Learn on DeepSpeed, Compress, Dream, the Gate "
                "(capability and safety checks), and the release of a candidate that passed. The rhythms' schedules "
                "run it one phase at a time.",
)


def phase_assets(rhythm: Rhythm, phases, phase_keys: dict[str, list[dg.AssetKey]]) -> list[dg.AssetKey]:
    """The assets a slot of ``rhythm`` materialises. Dreaming from the live release skips what only a
    cycle's own Compress candidate feeds (its gate suites and the red-team library refresh, which the
    weekly and monthly rhythms do)."""
    keys: list[dg.AssetKey] = []
    for phase in phases:
        for key in phase_keys[phase]:
            if rhythm.dream_from == "live" and phase == "dream" and key.to_user_string() in ("gate_suites",
                                                                                         "red_team_library"):
                continue
            if key not in keys:
                keys.append(key)
    return keys


def run_request(rhythm: Rhythm, when: dt.datetime, phase_keys: dict[str, list[dg.AssetKey]]) -> dg.RunRequest | None:
    """The run a rhythm's slot requests at ``when`` (in the rhythm's timezone), or None off its slots."""
    slot = rhythm.slot_at(when)
    if slot is None:
        return None
    cycle = rhythm.cycle_id(when)
    phases = "+".join(slot.phases)
    return dg.RunRequest(
        run_key=f"{cycle}:{phases}:{when.isoformat()}",
        asset_selection=phase_assets(rhythm, slot.phases, phase_keys),
        tags={CYCLE_TAG: cycle, RHYTHM_TAG: rhythm.name, PHASE_TAG: phases, AS_OF_TAG: when.date().isoformat(),
              **MODEL_RUN, **rhythm.run_limit_tags()},
    )


def rhythm_schedule(rhythm: Rhythm, timezone: str, phase_keys: dict[str, list[dg.AssetKey]]) -> dg.ScheduleDefinition:
    crons = list(dict.fromkeys(s.cron for s in rhythm.slots))
    slots = "; ".join(f"{s.cron}: {'+'.join(s.phases)}" + (f" ({s.note})" if s.note else "") for s in rhythm.slots)

    @dg.schedule(name=f"{rhythm.name}_rhythm", cron_schedule=crons, job=sleep_cycle_job, execution_timezone=timezone,
                 default_status=dg.DefaultScheduleStatus.RUNNING if rhythm.running else dg.DefaultScheduleStatus.STOPPED,
                 description=f"The {rhythm.name} rhythm ({rhythm.description}), in {timezone}: {slots}. Gate: "
                             f"{rhythm.gate} thresholds; release to {rhythm.release_to}.")
    def _schedule(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time
        if when is None:
            return dg.SkipReason("no scheduled time")
        when = when.astimezone(ZoneInfo(timezone)) if when.tzinfo else when.replace(tzinfo=ZoneInfo(timezone))
        request = run_request(rhythm, when, phase_keys)
        return request or dg.SkipReason(f"{when.isoformat()} is not a slot of the {rhythm.name} rhythm")

    return _schedule


def canary_promotion_sensor(interval_s: int = 300) -> dg.SensorDefinition:
    @dg.sensor(name="canary_promotion", job=promote_canary, minimum_interval_seconds=interval_s,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description="Promotes the canary release to live once it has soaked for its rhythm's soak_hours with no "
                           "regression alarm; a rhythm without soak_hours waits for a person.")
    def _sensor(context: dg.SensorEvaluationContext, storage: StorageResource, rhythms: RhythmsResource):
        due = promotion_due(storage.db_path, rhythms.load(), dt.datetime.now(dt.timezone.utc))
        if isinstance(due, str):
            return dg.SkipReason(due)
        return dg.RunRequest(run_key=f"promote-{due.version}",
                             run_config={"ops": {"promote_canary_release": {"config": {
                                 "version": due.version, "reason": "soaked without a regression alarm"}}}})

    return _sensor


def promotion_due(db_path, rhythms: Rhythms, now: dt.datetime):
    """The canary release to promote now, or why not (a string)."""
    found = registry.canary(db_path)
    if found is None:
        return "no canary release"
    rel, since = found
    rhythm = rhythms.get(rel.cadence)
    if rhythm is None or rhythm.soak_hours is None:
        return f"canary {rel.version} waits for a person to promote it ({rel.cadence or 'no'} rhythm has no soak period)"
    alarms = registry.open_alarms(db_path, rel.version)
    if alarms:
        return f"canary {rel.version} has an open regression alarm: {alarms[0]['reason']}"
    since = since.replace(tzinfo=dt.timezone.utc) if since.tzinfo is None else since
    soaked = (now - since).total_seconds() / 3600
    if soaked < rhythm.soak_hours:
        return f"canary {rel.version} has soaked {soaked:.1f} of {rhythm.soak_hours:g} hours"
    return rel


def training_trigger_sensor(rhythms: Rhythms) -> dg.SensorDefinition:
    trig = rhythms.trigger

    @dg.sensor(name="training_trigger", job=sleep_cycle_job, minimum_interval_seconds=trig.interval_s,
               default_status=dg.DefaultSensorStatus.STOPPED,
               description=f"Starts a whole cycle early ({trig.rhythm} rhythm's gate, channel and recipes) when "
                           f"{trig.new_records or 'no'} new records arrived, the last Learn is older than "
                           f"{trig.max_days if trig.max_days is not None else 'unlimited'} days, or a regression "
                           "alarm was raised on the live release; one cycle per occurrence (run key).")
    def _sensor(context: dg.SensorEvaluationContext, storage: StorageResource, data_recipe: DataRecipeResource,
                rhythms: RhythmsResource):
        return evaluate_trigger(context, storage, data_recipe, rhythms.load())

    return _sensor


def evaluate_trigger(context, storage: StorageResource, data_recipe: DataRecipeResource, rhythms: Rhythms):
    """The training trigger's evaluation: at most one early cycle at a time, one per condition occurrence."""
    instance = context.instance
    unfinished = instance.get_run_records(dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED]))
    busy = [r.dagster_run.run_id for r in unfinished if TRIGGER_TAG in r.dagster_run.tags]
    if busy:
        return dg.SkipReason(f"an early cycle is still queued or running ({busy[0]})")
    event = instance.get_latest_materialization_event(dg.AssetKey("trained_checkpoint"))
    last = (event.timestamp, event.storage_id) if event is not None else None
    fired = json.loads(context.cursor) if context.cursor else []
    held = training.conditions(rhythms.trigger, data_recipe.load(storage), storage.db_path, last)
    for cond in held:
        if cond.key in fired or instance.get_run_records(dg.RunsFilter(tags={"dagster/run_key": cond.key}), limit=1):
            continue  # this occurrence already started its cycle (before a daemon restart, too)
        context.update_cursor(json.dumps((fired + [cond.key])[-200:]))
        now = dt.datetime.now(dt.timezone.utc)
        return dg.RunRequest(run_key=cond.key, tags={
            CYCLE_TAG: f"early-{rhythms.trigger.rhythm}-{now:%Y%m%dT%H%M%S}", RHYTHM_TAG: rhythms.trigger.rhythm,
            PHASE_TAG: "whole cycle", TRIGGER_TAG: cond.reason[:200], **MODEL_RUN,
            **max_runtime_tags(rhythms.trigger.max_run_hours)})
    if held:
        return dg.SkipReason("every condition that holds has already started its cycle: "
                             + "; ".join(c.reason for c in held))
    return dg.SkipReason("no condition holds (new data, a stale Learn, a regression alarm)")


def build_automation(rhythms: Rhythms, phase_keys: dict[str, list[dg.AssetKey]]):
    """(schedules, sensors) of the rhythms recipe."""
    schedules = [rhythm_schedule(r, rhythms.timezone, phase_keys) for r in rhythms.rhythms.values()]
    return schedules, [canary_promotion_sensor(), training_trigger_sensor(rhythms)]
