"""Short-term memory: ``retrieval_index``, the index over the high-churn knowledge sources.

Weights are long-term memory (stable regularities only); facts that change from day to day live here.
A refresh screens what may enter (dedup, freshness window, a minimum quality score; every rejection
recorded with its reason), publishes a new BM25 index, and measures it on held-out questions: recall@k,
and answer accuracy of the live release reading the retrieved passages -- beside the same figures for
an index of everything unscreened, so "hits up, answers worse" is visible. It never touches weights.
"""

import datetime as dt
from typing import Optional
from zoneinfo import ZoneInfo

import dagster as dg

from assets.lineage import cycle_metadata, cycle_of
from assets.policies import IO_RETRY, permanent
from resources.storage import MemoryRecipeResource, RhythmsResource, StorageResource
from sleep_pipeline.memory import index as memory
from sleep_pipeline.rhythms import AS_OF_TAG

MEMORY_GROUP = "memory"


class IndexConfig(dg.Config):
    as_of: Optional[str] = None  # the refresh day (YYYY-MM-DD); default: the scheduled day, else today


def _pct(x) -> str:
    return "—" if x is None else f"{x:.3f}"


@dg.asset(
    group_name=MEMORY_GROUP,
    kinds={"bm25s", "duckdb"},
    retry_policy=IO_RETRY,
    description="The retrieval index over the high-churn knowledge sources (memory.yaml), quality-controlled "
                "(dedup, freshness window, minimum quality; rejections in retrieval_rejections with their reason), "
                "measured on every refresh (retrieval_refreshes): hit@k, recall@k, stale@k and the live release's "
                "answer accuracy reading the passages, beside the unscreened index's. Weights are untouched.",
)
def retrieval_index(context: dg.AssetExecutionContext, config: IndexConfig, storage: StorageResource,
                    memory_recipe: MemoryRecipeResource, rhythms: RhythmsResource) -> dg.MaterializeResult:
    recipe = memory_recipe.load(storage)
    day = config.as_of or context.run.tags.get(AS_OF_TAG)
    try:
        as_of = dt.date.fromisoformat(day) if day else dt.datetime.now(ZoneInfo(rhythms.load().timezone)).date()
    except ValueError as exc:
        raise permanent(f"as_of must be a date (YYYY-MM-DD), got {day!r}") from exc
    try:
        out = memory.refresh(storage.db_path, storage.root, recipe, as_of, cycle_id=cycle_of(context),
                             log=context.log.info)
    except memory.MemoryError_ as exc:
        raise permanent(str(exc)) from exc
    memory.prune(storage.root, storage.db_path)
    rows = ["| index | entries | hit@k | recall@k | stale@k | answer accuracy |", "|---|---|---|---|---|---|"]
    for name, m in out.metrics.items():
        n = len(out.screened.accepted) if name == "quality-controlled" else len(out.screened.everything)
        rows.append(f"| {name} | {n} | {_pct(m['hit_at_k'])} | {_pct(m['recall_at_k'])} | {_pct(m['stale_at_k'])} | "
                    f"{_pct(m.get('answer_accuracy'))} |")
    rows.append(f"| closed book (no passages) | 0 | — | — | — | {_pct(out.closed_book)} |")
    hist = ["| refresh | day | live | accepted | hit@k | recall@k | stale@k | answer accuracy | closed book | alarm |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    hist += [f"| {h['refresh_id']} | {h['as_of']} | {h['live_version'] or '—'} | {h['accepted']} | {_pct(h['hit_at_k'])} "
             f"| {_pct(h['recall_at_k'])} | {_pct(h['stale_at_k'])} | {_pct(h['answer_accuracy'])} | "
             f"{_pct(h['closed_book_accuracy'])} | {h['alarm_id'] or ''} |" for h in memory.history(storage.db_path)]
    qc = out.metrics["quality-controlled"]
    return dg.MaterializeResult(metadata={
        "refresh_id": out.refresh_id,
        "as_of": as_of.isoformat(),
        "entries_in": out.screened.entries_in,
        "accepted": len(out.screened.accepted),
        "rejected": dg.MetadataValue.json(out.screened.reasons()),
        "k": recipe.k,
        "hit_at_k": round(qc["hit_at_k"], 4),
        "recall_at_k": round(qc["recall_at_k"], 4),
        "answer_accuracy": round(qc["answer_accuracy"], 4) if qc.get("answer_accuracy") is not None else "not measured",
        "live_release": out.live_version or "none",
        "regression_alarm": out.alarm or "none",
        "quality_control": dg.MetadataValue.md("\n".join(rows)),
        "refreshes": dg.MetadataValue.md("\n".join(hist)),
        "examples": dg.MetadataValue.json(out.examples),
        "path": dg.MetadataValue.path(str(out.path)),
        "seconds": round(out.seconds, 1),
        "weights_touched": False,
        **cycle_metadata(context),
    })
