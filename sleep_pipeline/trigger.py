"""The training trigger (seed 001's ``should_trigger_training``): start a cycle early when enough new data
arrived, when the last Learn is too old, or when a regression alarm was raised on the live release.

Each condition has a *key* that names its occurrence -- the alarm's id, the sources' current sizes, the
last Learn's event -- which the sensor uses as the run key: the same occurrence never starts two cycles,
whatever the daemon restarts or how often the sensor looks; a new occurrence (more data, a newer stale
Learn, another alarm) has a new key.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from sleep_pipeline.config import DataRecipe, SourceConfig
from sleep_pipeline.release import registry
from sleep_pipeline.rhythms import Trigger
from sleep_pipeline.store import connect, ensure_schema, latest_ingests


@dataclass(frozen=True)
class Condition:
    kind: str  # alarm | new_data | stale
    key: str  # the run key of the cycle it starts
    reason: str


def count_units(src: SourceConfig) -> int:
    """Records in a source as ingest counts them (``lines_in``): JSONL lines, Parquet rows, files of a
    text folder; 0 for a source that does not exist."""
    path = Path(src.path)
    if not path.exists():
        return 0
    if src.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if src.format == "txt_dir":
        return sum(1 for p in path.iterdir() if p.is_file())
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def new_records(recipe: DataRecipe, db_path: Path) -> dict[str, int]:
    """Per source: records now in the file beyond what its last ingest read (all of them if never ingested)."""
    with connect(db_path) as con:
        ensure_schema(con)
        seen = latest_ingests(con, [s.name for s in recipe.sources])
    return {s.name: max(0, count_units(s) - seen.get(s.name, (0, 0, ""))[0]) for s in recipe.sources}


def conditions(trigger: Trigger, recipe: DataRecipe, db_path: Path, last_learn: tuple[float, int] | None,
               now: float | None = None) -> list[Condition]:
    """The conditions that hold now, most urgent first. ``last_learn`` is (timestamp, event id) of the
    latest Learn materialisation, or None when nothing was ever learned."""
    now = time.time() if now is None else now
    out: list[Condition] = []
    if trigger.on_alarm:
        live = registry.live(db_path)
        for alarm in registry.open_alarms(db_path, live.version) if live else []:
            out.append(Condition("alarm", f"alarm-{alarm['alarm_id']}",
                                 f"regression alarm {alarm['alarm_id']} on live {live.version}: {alarm['reason']}"))
    if trigger.new_records:
        fresh = new_records(recipe, db_path)
        total = sum(fresh.values())
        if total >= trigger.new_records:
            digest = hashlib.sha256(repr(sorted(fresh.items())).encode()).hexdigest()[:16]
            detail = ", ".join(f"{k} {v}" for k, v in sorted(fresh.items()) if v)
            out.append(Condition("new_data", f"new-data-{digest}",
                                 f"{total} new records since the last ingest ({detail}) >= {trigger.new_records}"))
    if trigger.max_days is not None:
        if last_learn is None:
            out.append(Condition("stale", "stale-never", "nothing has been learned yet"))
        else:
            days = (now - last_learn[0]) / 86400
            if days > trigger.max_days:
                out.append(Condition("stale", f"stale-{last_learn[1]}",
                                     f"the last Learn is {days:.1f} days old (> {trigger.max_days:g})"))
    return out
