"""What an upstream asset recorded: stages pass candidates, data versions and reports by the id their
upstream materialisation wrote into its metadata.

* The materialisation made in this run, when there is one (so two overlapping cycles each use their own).
* Else, for a run of a cycle (the ``sleep_pipeline/cycle`` tag a rhythm's schedule or the training
  trigger sets), the latest materialisation recorded *under the same cycle id*: Thursday's Dream takes
  the candidate Monday's Learn of the same week produced, never a newer one from another cycle; a phase
  whose predecessor has not run in this cycle fails and says so.
* Else (an asset materialised on its own, outside any cycle), the asset's latest materialisation.

Every phase asset records the cycle id it ran in (:func:`cycle_metadata`), which is what the Dagster UI
shows on each materialisation, so "which Learn fed which release" is one metadata value to follow.
"""

from __future__ import annotations

import dagster as dg

from assets.policies import permanent
from sleep_pipeline.rhythms import CYCLE_TAG, RHYTHM_TAG

SCAN_LIMIT = 1000  # materialisations of one asset looked through for a cycle's


def _value(v):
    return getattr(v, "value", getattr(v, "text", v))


def cycle_of(context) -> str | None:
    """The cycle id of this run (its ``sleep_pipeline/cycle`` tag), or None outside a cycle."""
    return context.run.tags.get(CYCLE_TAG)


def rhythm_of(context) -> str | None:
    """The rhythm (weekly, monthly, daily) whose schedule or trigger started this run, or None."""
    return context.run.tags.get(RHYTHM_TAG)


def cycle_metadata(context) -> dict:
    """What every phase asset records about the cycle it ran in."""
    return {"cycle_id": cycle_of(context) or f"run-{context.run.run_id[:8]}", "rhythm": rhythm_of(context) or "none"}


def _in_cycle(context, asset_key: dg.AssetKey, key: str, cycle: str):
    cursor, seen = None, 0
    while seen < SCAN_LIMIT:
        result = context.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset_key), limit=100,
                                                         cursor=cursor, ascending=False)
        for record in result.records:
            mat = record.asset_materialization
            if mat is not None and key in mat.metadata and str(_value(mat.metadata.get("cycle_id"))) == cycle:
                return mat
        seen += len(result.records)
        if not result.has_more:
            return None
        cursor = result.cursor
    return None


def recorded(context, asset: str, key: str) -> str:
    """Metadata ``key`` of ``asset``'s materialisation in this run; else, in a cycle, of its latest one
    in the same cycle; else of its latest one."""
    asset_key = dg.AssetKey.from_user_string(asset)
    for entry in reversed(context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)):
        mat = entry.asset_materialization
        if mat is not None and mat.asset_key == asset_key and key in mat.metadata:
            return str(_value(mat.metadata[key]))
    cycle = cycle_of(context)
    if cycle is not None:
        mat = _in_cycle(context, asset_key, key, cycle)
        if mat is None:
            raise permanent(f"cycle {cycle} has no {asset} yet: its phase has not run (or failed) in this cycle; "
                             f"run it for cycle {cycle} first (tag {CYCLE_TAG}={cycle})")
        return str(_value(mat.metadata[key]))
    event = context.instance.get_latest_materialization_event(asset_key)
    mat = event.asset_materialization if event else None
    if mat is None or key not in mat.metadata:
        raise permanent(f"{asset} has recorded no {key} yet: materialise {asset} first")
    return str(_value(mat.metadata[key]))
