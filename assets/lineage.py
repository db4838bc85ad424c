"""What an upstream asset recorded: stages pass candidates, data versions and reports by the id their
upstream materialisation wrote into its metadata — the one made in this run when there is one (so two
overlapping cycles each use their own), else the asset's latest materialisation (an asset
materialised on its own, downstream of an earlier run)."""

from __future__ import annotations

import dagster as dg


def _value(v):
    return getattr(v, "value", getattr(v, "text", v))


def recorded(context, asset: str, key: str) -> str:
    """Metadata ``key`` of ``asset``'s materialisation in this run, else of its latest one."""
    asset_key = dg.AssetKey.from_user_string(asset)
    for entry in reversed(context.instance.all_logs(context.run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)):
        mat = entry.asset_materialization
        if mat is not None and mat.asset_key == asset_key and key in mat.metadata:
            return str(_value(mat.metadata[key]))
    event = context.instance.get_latest_materialization_event(asset_key)
    mat = event.asset_materialization if event else None
    if mat is None or key not in mat.metadata:
        raise dg.Failure(f"{asset} has recorded no {key} yet: materialise {asset} first")
    return str(_value(mat.metadata[key]))
