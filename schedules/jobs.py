"""Jobs and schedules of the sleep cycle.

``sleep_cycle`` runs data hygiene → Learn → Gate → release. The schedules run it at two rhythms: a
quick nightly gate (fewer items per suite, the nightly thresholds) and a full weekly and monthly one.
They start stopped; turn them on in the UI (Automation) or with ``dagster schedule start``.
"""

import dagster as dg

# The main job: everything defined so far, checks included (blocking checks stop downstream steps).
sleep_cycle_job = dg.define_asset_job(
    "sleep_cycle",
    selection=dg.AssetSelection.all(),
    description="One sleep cycle: data hygiene and the data mix, Learn on DeepSpeed, the Gate "
                "(capability and safety checks), and the release of a candidate that passed.",
)


def _rhythm(name: str, cron: str, rhythm: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name, job=sleep_cycle_job, cron_schedule=cron, execution_timezone="UTC",
        run_config={"ops": {"gate_report": {"config": {"rhythm": rhythm}}}},
        tags={"sleep_pipeline/rhythm": rhythm},
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"The {rhythm} sleep cycle ({'quick' if rhythm == 'nightly' else 'full'} gate).",
    )


SCHEDULES = [
    _rhythm("nightly_sleep_cycle", "0 2 * * *", "nightly"),
    _rhythm("weekly_sleep_cycle", "0 3 * * 0", "weekly"),
    _rhythm("monthly_sleep_cycle", "0 4 1 * *", "monthly"),
]
