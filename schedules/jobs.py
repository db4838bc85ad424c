"""Jobs of the sleep cycle."""

import dagster as dg

# The main job: everything defined so far, checks included (blocking checks stop downstream steps).
sleep_cycle_job = dg.define_asset_job(
    "sleep_cycle",
    selection=dg.AssetSelection.all(),
    description="One sleep cycle on the configured sources: data hygiene and the data mix (Learn, Gate and release follow).",
)
