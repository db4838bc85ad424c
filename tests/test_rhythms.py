"""The three rhythms as schedules: evaluated at given instants (in the recipe's timezone) each requests
exactly the seed's phase on the seed's day and hour, under one cycle id per week / month / day; the
recipe is validated; canary promotion waits for the soak and for alarms to clear; the training trigger
fires once per condition, daemon restarts included."""

import datetime as dt
import json
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import yaml
from dagster._utils.schedules import cron_string_iterator

import definitions
from schedules.jobs import promotion_due
from sleep_pipeline.recipe_checks import RecipeError
from sleep_pipeline.release import registry
from sleep_pipeline.rhythms import CYCLE_TAG, PHASE_TAG, RHYTHM_TAG, cron_matches, load_rhythms
from tests.conftest import RECIPES
from tests.test_release_registry import make_checkpoint



def _ckpt(root, name):
    return make_checkpoint(root / "ck", name)[0]


LEARN = {"raw/curated_tasks", "deduped_corpus", "tiered_data_mix", "trained_checkpoint"}


def _tick(defs, schedule: str, when: dt.datetime):
    data = defs.get_schedule_def(schedule).evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when))
    reqs = data.run_requests or []
    assert len(reqs) <= 1
    return reqs[0] if reqs else None


def _phase(req) -> tuple[str, str, set[str]] | None:
    if req is None:
        return None
    return req.tags[PHASE_TAG], req.tags[CYCLE_TAG], {k.to_user_string() for k in req.asset_selection}


@pytest.fixture
def shanghai(recipes_dir, storage):
    """The shipped rhythms in Asia/Shanghai (UTC+8): the seed's hours are local hours."""
    raw = yaml.safe_load((recipes_dir / "rhythms.yaml").read_text())
    raw["timezone"] = "Asia/Shanghai"
    (recipes_dir / "rhythms.yaml").write_text(yaml.safe_dump(raw))
    return definitions.build_defs(recipes_dir, storage)


def test_weekly_rhythm_runs_each_phase_on_its_day_and_hour_in_the_timezone(shanghai):
    tz = ZoneInfo("Asia/Shanghai")
    week = {}
    # every hour of the ISO week 2026-W50 (Mon 7 Dec - Sun 13 Dec, Shanghai time)
    start = dt.datetime(2026, 12, 7, 0, 0, tzinfo=tz)
    for h in range(7 * 24):
        when = start + dt.timedelta(hours=h)
        got = _phase(_tick(shanghai, "weekly_rhythm", when))
        if got:
            week[(when.strftime("%a"), when.hour)] = got
    assert {k: v[0] for k, v in week.items()} == {
        ("Mon", 1): "learn", ("Wed", 1): "compress", ("Thu", 1): "dream", ("Fri", 9): "gate",
        ("Fri", 18): "release", ("Sat", 3): "index", ("Sun", 3): "index"}
    assert {v[1] for v in week.values()} == {"weekly-2026-W50"}  # one cycle id across the week
    assert LEARN <= week[("Mon", 1)][2] and "compressed_checkpoint" not in week[("Mon", 1)][2]
    assert week[("Wed", 1)][2] == {"compressed_checkpoint"}
    assert week[("Thu", 1)][2] == {"gate_suites", "red_team_library", "dream_set", "dreamed_checkpoint"}
    assert week[("Fri", 9)][2] == {"gate_report"} and week[("Fri", 18)][2] == {"gated_release"}
    assert week[("Sat", 3)][2] == week[("Sun", 3)][2] == {"retrieval_index"}  # weights untouched at the weekend
    # Monday 01:00 in Shanghai is Sunday 17:00 UTC: the same tick, whatever zone the instant is given in
    utc = _phase(_tick(shanghai, "weekly_rhythm", dt.datetime(2026, 12, 6, 17, 0, tzinfo=dt.timezone.utc)))
    assert utc[:2] == ("learn", "weekly-2026-W50")
    assert _tick(shanghai, "weekly_rhythm", dt.datetime(2026, 12, 7, 1, 0, tzinfo=dt.timezone.utc)) is None


def test_monthly_rhythm_runs_one_phase_a_week_and_a_release_candidate_in_week_four(shanghai):
    tz = ZoneInfo("Asia/Shanghai")
    month = {}
    for d in range(1, 32):
        for hour in range(24):
            when = dt.datetime(2026, 12, d, hour, 0, tzinfo=tz)
            got = _phase(_tick(shanghai, "monthly_rhythm", when))
            if got:
                month[(d, hour)] = got
    assert {k: v[0] for k, v in month.items()} == {(1, 1): "learn", (8, 1): "compress", (15, 1): "dream",
                                                   (22, 1): "gate+release"}
    assert {v[1] for v in month.values()} == {"monthly-2026-12"}
    assert month[(22, 1)][2] == {"gate_report", "gated_release"}
    # week 1's Learn is the large one: the monthly rhythm's own Learn recipe, twice the weekly steps
    rhythms, learn = shanghai.resources["rhythms"].load(), shanghai.resources["learn_recipe"]
    monthly, weekly = learn.load(rhythms.get("monthly")), learn.load(rhythms.get("weekly"))
    assert monthly.source.endswith("learn_monthly.yaml") and weekly.source.endswith("learn.yaml")
    assert monthly.training.max_steps == 2 * weekly.training.max_steps


def test_daily_rhythm_refreshes_at_2_dreams_from_live_at_3_and_gates_at_5(shanghai):
    tz = ZoneInfo("Asia/Shanghai")
    day = {}
    for hour in range(24):
        got = _phase(_tick(shanghai, "daily_rhythm", dt.datetime(2026, 12, 4, hour, 0, tzinfo=tz)))
        if got:
            day[hour] = got
    assert {h: v[0] for h, v in day.items()} == {2: "index", 3: "dream", 5: "gate+release"}
    assert {v[1] for v in day.values()} == {"daily-2026-12-04"}
    # the daily dream starts from the live release: no cycle gate suites or red-team refresh of its own
    assert day[3][2] == {"dream_set", "dreamed_checkpoint"}
    assert day[5][2] == {"gate_report", "gated_release"}
    assert day[2][2] == {"retrieval_index"}


def test_the_cron_matcher_agrees_with_dagsters_scheduler():
    """The slot lookup and Dagster's own tick iterator agree on every hour of a month, for every slot."""
    rhythms = load_rhythms(RECIPES)
    tz = "Asia/Shanghai"
    start = dt.datetime(2026, 11, 30, 23, 0, tzinfo=ZoneInfo(tz))
    end = dt.datetime(2027, 1, 1, 0, 0, tzinfo=ZoneInfo(tz))
    for rhythm in rhythms.rhythms.values():
        for slot in rhythm.slots:
            ticks = set()
            for t in cron_string_iterator(start.timestamp(), slot.cron, tz):
                if t > end:
                    break
                ticks.add(t.astimezone(ZoneInfo(tz)).replace(tzinfo=None))
            mine = set()
            when = start
            while when <= end:
                if cron_matches(slot.cron, when):
                    mine.add(when.replace(tzinfo=None))
                when += dt.timedelta(hours=1)
            assert mine == {t for t in ticks if t.minute == 0} and mine, (rhythm.name, slot.cron)


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(timezone="Mars/Olympus"), "timezone: unknown timezone 'Mars/Olympus'"),
    (lambda r: r["rhythms"]["weekly"]["slots"][0].update(at="0 25 * * 1"), "rhythms.weekly.slots[0].at: hour '25'"),
    (lambda r: r["rhythms"]["weekly"]["slots"][0].update(phases=["sleep"]), "rhythms.weekly.slots[0].phases: unknown phase 'sleep'"),
    (lambda r: r["rhythms"]["daily"].update(release_to="beta"), "rhythms.daily.release_to: unknown channel 'beta'"),
    (lambda r: r["rhythms"]["daily"]["recipes"].update(dream="nowhere.yaml"), "rhythms.daily.recipes.dream:"),
    (lambda r: r["trigger"].update(rhythm="hourly"), "trigger.rhythm: unknown rhythm 'hourly'"),
])
def test_a_wrong_rhythm_recipe_is_refused_with_the_field_named(recipes_dir, change, message):
    raw = yaml.safe_load((recipes_dir / "rhythms.yaml").read_text())
    change(raw)
    (recipes_dir / "rhythms.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="rhythms.yaml: " + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        load_rhythms(recipes_dir)


def test_a_canary_is_promoted_after_its_soak_unless_an_alarm_was_raised(tmp_path, recipes_dir):
    db = tmp_path / "sleep.duckdb"
    rhythms = load_rhythms(recipes_dir)
    stable = registry.release(db, _ckpt(tmp_path, "a"), "d1", "g1")
    canary = registry.release(db, _ckpt(tmp_path, "b"), "d2", "g2", channel="canary", cadence="weekly",
                              cycle_id="weekly-2026-W50")
    assert registry.live(db).version == stable.version  # a canary release does not move live
    assert registry.live(db, "canary").version == canary.version
    since = registry.canary(db)[1]
    now = since + dt.timedelta(hours=59)
    assert "soaked 59.0 of 60 hours" in promotion_due(db, rhythms, now.replace(tzinfo=dt.timezone.utc))
    later = (since + dt.timedelta(hours=61)).replace(tzinfo=dt.timezone.utc)
    alarm = registry.raise_alarm(db, canary.version, "support tickets doubled", source="monitoring")
    assert "open regression alarm: support tickets doubled" in promotion_due(db, rhythms, later)
    with pytest.raises(registry.ReleaseError, match="open regression alarm"):
        registry.promote(db)
    registry.clear_alarm(db, alarm, "a false alarm: a dashboard bug")
    assert promotion_due(db, rhythms, later).version == canary.version
    with pytest.raises(registry.ReleaseError, match="is not the canary"):
        registry.promote(db, stable.version)
    registry.promote(db, canary.version, reason="soaked")
    assert registry.live(db).version == canary.version and registry.canary(db) is None
    assert promotion_due(db, rhythms, later) == "no canary release"
    # a rollback after a promotion goes back to the stable release before it
    assert registry.rollback(db).version == stable.version
    # a monthly release candidate waits for a person, however long it soaks
    monthly = registry.release(db, _ckpt(tmp_path, "c"), "d3", "g3", channel="canary", cadence="monthly")
    far = (registry.canary(db)[1] + dt.timedelta(days=60)).replace(tzinfo=dt.timezone.utc)
    assert "waits for a person" in promotion_due(db, rhythms, far)
    # a revoked canary is withdrawn from the channel
    registry.revoke(db, monthly.version, "bad data in week 1")
    assert registry.canary(db) is None


def test_the_training_trigger_fires_once_per_condition_across_daemon_restarts(recipes_dir, storage):
    raw = yaml.safe_load((recipes_dir / "rhythms.yaml").read_text())
    raw["trigger"].update(new_records=5, max_days=None, on_alarm=True)
    (recipes_dir / "rhythms.yaml").write_text(yaml.safe_dump(raw))
    defs = definitions.build_defs(recipes_dir, storage)
    sensor = defs.get_sensor_def("training_trigger")
    instance = dg.DagsterInstance.ephemeral()

    def evaluate(cursor=None):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources,
                                      sensor_name="training_trigger")
        data = sensor.evaluate_tick(ctx)
        return data.run_requests or [], data.cursor, data.skip_message

    def launch(req):
        """What the daemon does with a run request: a run tagged with its run key (then it finishes)."""
        run = instance.create_run_for_job(defs.resolve_job_def("rollback_release"),
                                          tags={**req.tags, "dagster/run_key": req.run_key})
        instance.report_run_canceled(run)

    # nothing was ever ingested: every generated record is new
    reqs, cursor, _ = evaluate()
    assert len(reqs) == 1 and reqs[0].run_key.startswith("new-data-")
    assert reqs[0].tags[RHYTHM_TAG] == "weekly" and reqs[0].tags[CYCLE_TAG].startswith("early-weekly-")
    assert "new records since the last ingest" in reqs[0].tags["sleep_pipeline/trigger"]
    launch(reqs[0])
    assert evaluate(cursor)[0] == []  # the same data does not start a second cycle ...
    reqs2, _, skip = evaluate(None)  # ... nor after a daemon restart that lost the cursor
    assert reqs2 == [] and "already started its cycle" in skip

    # a regression alarm on the live release is another occurrence: one more cycle, once
    live = registry.release(storage / "sleep.duckdb", _ckpt(storage, "live"), "d", "g")
    alarm = registry.raise_alarm(storage / "sleep.duckdb", live.version, "answer accuracy fell", source="index")
    reqs3, cursor3, _ = evaluate(cursor)
    assert [r.run_key for r in reqs3] == [f"alarm-{alarm}"]
    launch(reqs3[0])
    assert evaluate(cursor3)[0] == [] and evaluate(None)[0] == []
    # more data arriving is a new occurrence again
    src = storage / "sources" / "curated_tasks.jsonl"
    src.write_text(src.read_text() + "".join(json.dumps({"id": f"n{i}", "prompt": "p", "response": "r",
                                                         "bucket": "reasoning"}) + "\n" for i in range(3)))
    reqs4, _, _ = evaluate(cursor3)
    assert len(reqs4) == 1 and reqs4[0].run_key.startswith("new-data-") and reqs4[0].run_key != reqs[0].run_key


def test_two_model_runs_never_share_the_accelerator_under_the_shipped_instance_config(recipes_dir, storage):
    """The shipped dagster.yaml limits runs carrying the accelerator tag to one at a time, and every run of
    sleep_cycle (each rhythm's slots, the trigger's early cycle) carries it: the queue's own counter blocks
    a second one while the first is in progress; a promotion (no model loaded) is not held up."""
    from dagster._utils.tags import TagConcurrencyLimitsCounter

    from tests.conftest import ROOT

    defs = definitions.build_defs(recipes_dir, storage)
    overrides = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    with dg.instance_for_test(overrides=overrides) as instance:
        limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        monday = _tick(defs, "weekly_rhythm", dt.datetime(2026, 12, 7, 1, tzinfo=dt.timezone.utc))
        nightly = _tick(defs, "daily_rhythm", dt.datetime(2026, 12, 7, 3, tzinfo=dt.timezone.utc))
        job = defs.resolve_job_def("sleep_cycle")
        first = instance.create_run_for_job(job, tags=monday.tags, asset_selection=frozenset(monday.asset_selection))
        second = instance.create_run_for_job(job, tags=nightly.tags, asset_selection=frozenset(nightly.asset_selection))
        promote = instance.create_run_for_job(defs.resolve_job_def("promote_canary"))
        counter = TagConcurrencyLimitsCounter(limits, [first])
        assert counter.is_blocked(second) and not counter.is_blocked(promote)
        assert not TagConcurrencyLimitsCounter(limits, []).is_blocked(second)


def test_release_promote_and_alarms_from_the_command_line(tmp_path, capsys):
    from sleep_pipeline import cli

    db = tmp_path / "sleep.duckdb"
    registry.release(db, _ckpt(tmp_path, "a"), "d1", "g1")
    registry.release(db, _ckpt(tmp_path, "b"), "d2", "g2", channel="canary", cadence="monthly")
    home = ["--home", str(tmp_path)]
    assert cli.main(["release", "list", *home]) == 0
    assert "c v0002" in capsys.readouterr().out
    assert cli.main(["alarm", "raise", "--version", "v0002", "--reason", "latency up 3x", *home]) == 0
    alarm = capsys.readouterr().out.split()[1]
    assert cli.main(["release", "promote", *home]) == 2
    assert "open regression alarm (latency up 3x)" in capsys.readouterr().err
    assert registry.live(db).version == "v0001"
    assert cli.main(["alarm", "clear", alarm, "--reason", "a load test", *home]) == 0
    assert cli.main(["release", "promote", "v0002", *home]) == 0
    assert "promoted canary v0002 to live (was v0001)" in capsys.readouterr().out
    assert registry.live(db).version == "v0002" and registry.canary(db) is None
