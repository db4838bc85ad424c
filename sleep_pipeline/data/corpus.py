"""Ingest sources into DuckDB and build the deduplicated corpus from them.

``ingest_source`` reads one source (generating it first for the embedded default) and replaces that
source's rows in ``raw_records`` and its ingest-stage rows in ``quarantine``. ``build_deduped_corpus``
reads every configured source's records, applies the quality filters (rejects go to ``quarantine``),
scrubs PII, removes exact and near duplicates (recorded in ``duplicates`` with ``duplicate_of``) and
writes ``deduped_corpus``. The accounting is checked, not assumed: records in = kept + quarantined
+ duplicates, per source.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sleep_pipeline.config import DataRecipe, DedupConfig, QualityConfig, SourceConfig, stable_hash
from sleep_pipeline.data.clean import quality_issue, scrub_pii
from sleep_pipeline.data.dedup import DedupResult, dedup
from sleep_pipeline.data.generate import generate_source
from sleep_pipeline.data.ingest import QuarantineRow, excerpt, read_source
from sleep_pipeline.progress import LogFn, Progress
from sleep_pipeline.store import connect, ensure_schema, insert_rows, latest_ingests, query_dicts, utcnow

RECORD_COLUMNS = ("record_id", "source", "tier", "line_no", "bucket", "system", "prompt", "response", "meta")


QUARANTINE_COLUMNS = ("stage", "source", "line_no", "record_id", "reason", "detail", "excerpt", "run_ref", "created_at")


def _quarantine_dicts(rows: list[QuarantineRow], run_ref: str) -> list[dict]:
    now = utcnow()
    return [{**asdict(q), "run_ref": run_ref, "created_at": now} for q in rows]


# ------------------------------------------------------------------------------------- ingest
@dataclass
class IngestSummary:
    source: str
    path: str
    format: str
    tier: int
    content_sha256: str
    lines_in: int
    records_ok: int
    quarantined: int
    reasons: dict[str, int]
    buckets: dict[str, int]
    generated: bool


def ingest_source(src: SourceConfig, recipe: DataRecipe, db_path: Path, run_ref: str, log: LogFn | None = None) -> IngestSummary:
    generated = False
    if src.generator and not src.path.exists():
        if log:
            log(f"{src.name}: generating the embedded default source at {src.path}")
        generate_source(src, max_record_bytes=recipe.quality.max_record_bytes)
        generated = True
    result = read_source(src, recipe.quality)
    ingest_id = f"{src.name}-{result.content_sha256[:12]}"
    for r in result.records:
        r["ingest_id"] = ingest_id
    buckets: dict[str, int] = {}
    for r in result.records:
        buckets[r["bucket"]] = buckets.get(r["bucket"], 0) + 1
    with connect(db_path) as con:
        ensure_schema(con)
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM raw_records WHERE source = ?", [src.name])
        con.execute("DELETE FROM quarantine WHERE stage = 'ingest' AND source = ?", [src.name])
        insert_rows(con, "raw_records", RECORD_COLUMNS + ("ingest_id",), result.records)
        insert_rows(con, "quarantine", QUARANTINE_COLUMNS, _quarantine_dicts(result.quarantine, run_ref))
        con.execute(
            "INSERT INTO source_ingests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [ingest_id, src.name, str(src.path), src.format, src.tier, result.content_sha256,
             result.lines_in, len(result.records), len(result.quarantine), utcnow()],
        )
        con.execute("COMMIT")
    return IngestSummary(
        source=src.name, path=str(src.path), format=src.format, tier=src.tier,
        content_sha256=result.content_sha256, lines_in=result.lines_in, records_ok=len(result.records),
        quarantined=len(result.quarantine), reasons=result.reason_counts(), buckets=buckets, generated=generated,
    )


# ------------------------------------------------------------------------------------- corpus
@dataclass
class CorpusSummary:
    corpus_version: str
    records_in: int  # lines read from all sources
    kept: int
    quarantined: int  # at ingest + by the quality filters
    duplicates: int
    exact_duplicates: int
    near_duplicates: int
    duplicate_rate: float
    pii_scrubbed: dict[str, int]
    per_source: dict[str, dict[str, int]]
    per_reason: dict[str, int]
    per_bucket: dict[str, int]
    dedup_stats: dict
    seconds: float
    sample: list[dict] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        return self.records_in == self.kept + self.quarantined + self.duplicates and all(
            s["in"] == s["kept"] + s["quarantined"] + s["duplicates"] for s in self.per_source.values()
        )


def dedup_text(record: dict) -> str:
    """What two records must share to be duplicates: the request and the answer (not the system
    scaffold such as a tool catalogue, which many distinct items share)."""
    return f"{record['prompt']}\n{record['response']}"


@dataclass
class Cleaned:
    kept: list[dict]  # records with cluster_id (and pii_scrubbed)
    duplicates: list[dict]  # record_id, source, tier, line_no, duplicate_of, kind, similarity, cluster_id
    rejected: list[QuarantineRow]
    pii_counts: dict[str, int]
    result: DedupResult


def clean_and_dedup(rows: list[dict], quality: QualityConfig, dedup_config: DedupConfig, log: LogFn | None = None,
                    scrub: bool = True) -> Cleaned:
    """Quality filters (rejects -> quarantine rows), PII scrubbing, then exact + near dedup.
    ``rows`` are canonical records in priority order (ties between equal tiers keep the earlier)."""
    rejected: list[QuarantineRow] = []
    candidates: list[dict] = []
    pii_counts: dict[str, int] = {}
    progress = Progress("corpus: clean", len(rows), log)
    for i, r in enumerate(rows):
        text = "\n".join(x for x in (r["system"], r["prompt"], r["response"]) if x)
        issue = quality_issue(text, quality)
        if issue:
            rejected.append(QuarantineRow("clean", r["source"], r["line_no"], r["record_id"], issue[0], issue[1], excerpt(text)))
            continue
        found_all: list[str] = []
        if scrub:
            for key in ("system", "prompt", "response"):
                r[key], found = scrub_pii(r[key], quality.pii_entities)
                found_all.extend(found)
        for ent in found_all:
            pii_counts[ent] = pii_counts.get(ent, 0) + 1
        candidates.append({**r, "pii_scrubbed": ",".join(sorted(set(found_all)))})
        if i % 2000 == 0:
            progress.update(i)
    progress.finish()

    # The prompt is where template text (a procedural task's instructions) may be; the answer is content.
    result = dedup([dedup_text(r) for r in candidates], [r["tier"] for r in candidates], dedup_config, log,
                   requests=[r["prompt"] for r in candidates])
    kept, dups = [], []
    for i, r in enumerate(candidates):
        cluster_id = candidates[int(result.cluster[i])]["record_id"]
        if result.kept[i]:
            kept.append({**r, "cluster_id": cluster_id})
        else:
            dups.append({
                "record_id": r["record_id"], "source": r["source"], "tier": r["tier"], "line_no": r["line_no"],
                "duplicate_of": candidates[int(result.duplicate_of[i])]["record_id"], "kind": result.kind[i],
                "similarity": round(float(result.similarity[i]), 4), "cluster_id": cluster_id,
            })
    return Cleaned(kept=kept, duplicates=dups, rejected=rejected, pii_counts=pii_counts, result=result)


def build_deduped_corpus(recipe: DataRecipe, db_path: Path, run_ref: str, log: LogFn | None = None) -> CorpusSummary:
    start = time.perf_counter()
    names = [s.name for s in recipe.sources]
    with connect(db_path) as con:
        ensure_schema(con)
        ingest_by_source = latest_ingests(con, names)
        rows = query_dicts(
            con, f"SELECT {', '.join(RECORD_COLUMNS)} FROM raw_records WHERE source IN (SELECT unnest(?::VARCHAR[]))",
            [names])
        ingest_q = con.execute(
            "SELECT source, reason, count(*) FROM quarantine WHERE stage = 'ingest' AND source IN (SELECT unnest(?::VARCHAR[])) GROUP BY ALL",
            [names],
        ).fetchall()
    missing = [n for n in names if n not in ingest_by_source]
    if missing:
        raise RuntimeError(f"sources never ingested: {', '.join(missing)} (materialise their assets first)")
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order[r["source"]], r["line_no"]))
    if log:
        log(f"corpus: {len(rows):,} records from {len(names)} sources")

    cleaned = clean_and_dedup(rows, recipe.quality, recipe.dedup, log)
    corpus_version = "cv-" + stable_hash(
        {"ingests": sorted((s, ingest_by_source[s][2]) for s in names), "quality": asdict(recipe.quality), "dedup": asdict(recipe.dedup)}
    )
    kept_rows = [{**r, "corpus_version": corpus_version} for r in cleaned.kept]
    dup_rows = [{**r, "corpus_version": corpus_version} for r in cleaned.duplicates]
    rejected, result, pii_counts = cleaned.rejected, cleaned.result, cleaned.pii_counts

    per_source = {n: {"in": ingest_by_source[n][0], "kept": 0, "quarantined": ingest_by_source[n][1], "duplicates": 0} for n in names}
    for r in kept_rows:
        per_source[r["source"]]["kept"] += 1
    for r in dup_rows:
        per_source[r["source"]]["duplicates"] += 1
    for q in rejected:
        per_source[q.source]["quarantined"] += 1
    per_reason: dict[str, int] = {}
    for s, reason, c in ingest_q:
        per_reason[reason] = per_reason.get(reason, 0) + c
    for q in rejected:
        per_reason[q.reason] = per_reason.get(q.reason, 0) + 1
    per_bucket: dict[str, int] = {}
    for r in kept_rows:
        per_bucket[r["bucket"]] = per_bucket.get(r["bucket"], 0) + 1

    summary = CorpusSummary(
        corpus_version=corpus_version,
        records_in=sum(v["in"] for v in per_source.values()),
        kept=len(kept_rows),
        quarantined=sum(v["quarantined"] for v in per_source.values()),
        duplicates=len(dup_rows),
        exact_duplicates=result.stats.get("exact_duplicates", 0),
        near_duplicates=result.stats.get("near_duplicates", 0),
        duplicate_rate=len(dup_rows) / max(len(kept_rows) + len(dup_rows), 1),
        pii_scrubbed=pii_counts,
        per_source=per_source,
        per_reason=dict(sorted(per_reason.items())),
        per_bucket=dict(sorted(per_bucket.items())),
        dedup_stats=result.stats,
        seconds=0.0,
        sample=[{k: r[k] for k in ("record_id", "bucket", "tier", "prompt", "response")} for r in kept_rows[:: max(len(kept_rows) // 8, 1)][:8]],
    )
    if not summary.balanced:
        raise RuntimeError(f"record accounting does not balance: {summary.per_source}")

    corpus_cols = RECORD_COLUMNS + ("cluster_id", "pii_scrubbed", "corpus_version")
    dup_cols = ("record_id", "source", "tier", "line_no", "duplicate_of", "kind", "similarity", "cluster_id", "corpus_version")
    with connect(db_path) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM deduped_corpus")
        con.execute("DELETE FROM duplicates")
        con.execute("DELETE FROM quarantine WHERE stage = 'clean'")
        insert_rows(con, "deduped_corpus", corpus_cols, kept_rows)
        insert_rows(con, "duplicates", dup_cols, dup_rows)
        insert_rows(con, "quarantine", QUARANTINE_COLUMNS, _quarantine_dicts(rejected, run_ref))
        summary.seconds = round(time.perf_counter() - start, 2)
        stats = {k: v for k, v in asdict(summary).items() if k != "sample"}
        con.execute("INSERT INTO corpus_versions VALUES (?, ?, ?)", [corpus_version, utcnow(), json.dumps(stats)])
        con.execute("COMMIT")
    return summary
