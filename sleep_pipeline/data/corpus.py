"""Ingest sources into DuckDB and build the deduplicated corpus from them.

``ingest_source`` reads one source (generating it first for the embedded default) and replaces that
source's rows in ``raw_records`` and its ingest-stage rows in ``quarantine``. ``build_deduped_corpus``
reads every configured source's records, applies the quality filters (rejects go to ``quarantine``),
scrubs PII, removes exact and near duplicates (recorded in ``duplicates`` with ``duplicate_of``) and
writes ``deduped_corpus``. The accounting is checked, not assumed: records in = kept + quarantined
+ duplicates, per source.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sleep_pipeline.config import DataRecipe, DedupConfig, QualityConfig, SourceConfig, stable_hash
from sleep_pipeline.data.clean import quality_issue, scrub_pii
from sleep_pipeline.data.dedup import DedupResult, dedup
from sleep_pipeline.data.generate import generate_source
from sleep_pipeline.data.ingest import QuarantineRow, SourceError, content_sha256, duplicate_id, excerpt, read_source
from sleep_pipeline.progress import LogFn, Progress
from sleep_pipeline.store import connect, ensure_schema, insert_rows, latest_ingests, query_dicts, utcnow

RECORD_COLUMNS = ("record_id", "source", "tier", "line_no", "bucket", "system", "prompt", "response", "meta")


QUARANTINE_COLUMNS = ("stage", "source", "line_no", "record_id", "reason", "detail", "excerpt", "run_ref", "created_at")


@dataclass
class RayOptions:
    """Where and how the ``ray`` backend runs (the Dagster resource fills this in)."""

    address: str | None = None  # None: start a local cluster in this process
    num_cpus: int | None = None  # for a local cluster
    partition_rows: int = 50_000  # records per partition (more partitions for a larger corpus)
    batch_rows: int = 10_000  # records the driver reads and sends at a time
    ingest_chunk_bytes: int = 32 << 20  # bytes of a source file one task parses
    # Files the driver and the workers exchange (exported records, results): a folder both see at the
    # same path. None: beside the DuckDB file.
    exchange_dir: str | None = None
    driver_memory_mb: int = 256  # DuckDB's memory limit in the driver while it moves the files (it spills past it)
    min_partitions: int = 2

    def partitions(self, records: int) -> int:
        return max(self.min_partitions, -(-records // max(self.partition_rows, 1)))


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


def ingest_source(src: SourceConfig, recipe: DataRecipe, db_path: Path, run_ref: str, log: LogFn | None = None,
                  ray: RayOptions | None = None) -> IngestSummary:
    generated = False
    if src.generator and not src.path.exists():
        if log:
            log(f"{src.name}: generating the embedded default source at {src.path}")
        generate_source(src, max_record_bytes=recipe.quality.max_record_bytes)
        generated = True
    if recipe.backend == "ray":
        return _ingest_on_ray(src, recipe, db_path, run_ref, log, ray or RayOptions(), generated)
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


def _ingest_on_ray(src: SourceConfig, recipe: DataRecipe, db_path: Path, run_ref: str, log: LogFn | None,
                   ray: RayOptions, generated: bool) -> IngestSummary:
    """``ingest_source`` with the source parsed by Ray tasks: the same rows and quarantine rows. Records
    are staged in DuckDB as chunks arrive; ids used by an earlier line are quarantined there."""
    from sleep_pipeline.data.ray_dedup import ray_session
    from sleep_pipeline.data.ray_ingest import read_source_on_ray

    if not src.path.exists():
        raise SourceError(f"source {src.name!r}: {src.path} does not exist")
    sha = content_sha256(src)
    ingest_id = f"{src.name}-{sha[:12]}"
    quarantine_at = utcnow()
    with connect(db_path) as con:
        ensure_schema(con)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"CREATE TEMP TABLE _stage AS SELECT {', '.join(RECORD_COLUMNS)}, '' AS _excerpt "
                        "FROM raw_records LIMIT 0")
            con.execute("DELETE FROM raw_records WHERE source = ?", [src.name])
            con.execute("DELETE FROM quarantine WHERE stage = 'ingest' AND source = ?", [src.name])
            lines_in = 0
            con.execute(f"SET memory_limit = '{int(ray.driver_memory_mb)}MB'")
            with _exchange(db_path, ray, run_ref) as folder, ray_session(ray.address, ray.num_cpus, log):
                for kind, payload in read_source_on_ray(src, recipe.quality, ray.ingest_chunk_bytes, log, str(folder)):
                    if kind == "lines":
                        lines_in += payload
                    elif kind == "quarantine":
                        insert_rows(con, "quarantine", QUARANTINE_COLUMNS,
                                    [{**q, "run_ref": run_ref, "created_at": quarantine_at} for q in payload])
                    elif payload is not None:
                        _insert_result(con, "_stage", RECORD_COLUMNS + ("_excerpt",), payload, {})
            if lines_in == 0:
                raise SourceError(f"source {src.name!r}: {src.path} is empty (no records to read)")
            ranked = ("SELECT *, row_number() OVER (PARTITION BY record_id ORDER BY line_no) AS _rank FROM _stage")
            dups = query_dicts(con, f"SELECT record_id, line_no, _excerpt FROM ({ranked}) WHERE _rank > 1 ORDER BY line_no")
            insert_rows(con, "quarantine", QUARANTINE_COLUMNS, _quarantine_dicts(
                [duplicate_id(src, d, d["_excerpt"]) for d in dups], run_ref))
            con.execute(f"INSERT INTO raw_records ({', '.join(RECORD_COLUMNS)}, ingest_id) "
                        f"SELECT {', '.join(RECORD_COLUMNS)}, ? FROM ({ranked}) WHERE _rank = 1 ORDER BY line_no",
                        [ingest_id])
            records_ok = con.execute("SELECT count(*) FROM raw_records WHERE source = ?", [src.name]).fetchone()[0]
            buckets = dict(con.execute("SELECT bucket, count(*) FROM raw_records WHERE source = ? GROUP BY bucket",
                                       [src.name]).fetchall())
            reasons = dict(con.execute("SELECT reason, count(*) FROM quarantine WHERE stage = 'ingest' AND source = ? "
                                       "GROUP BY reason", [src.name]).fetchall())
            quarantined = sum(reasons.values())
            con.execute(
                "INSERT INTO source_ingests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [ingest_id, src.name, str(src.path), src.format, src.tier, sha, lines_in, records_ok, quarantined,
                 utcnow()],
            )
            con.execute("DROP TABLE _stage")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return IngestSummary(
        source=src.name, path=str(src.path), format=src.format, tier=src.tier, content_sha256=sha,
        lines_in=lines_in, records_ok=records_ok, quarantined=quarantined, reasons=reasons, buckets=buckets,
        generated=generated,
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


def clean_rows(rows: list[dict], quality: QualityConfig, log: LogFn | None = None,
               scrub: bool = True) -> tuple[list[dict], list[QuarantineRow], dict[str, int]]:
    """Quality filters (rejects -> quarantine rows) and PII scrubbing of canonical records: (the
    records that pass, with ``pii_scrubbed``; the rejects; PII spans per entity)."""
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
    return candidates, rejected, pii_counts


def clean_and_dedup(rows: list[dict], quality: QualityConfig, dedup_config: DedupConfig, log: LogFn | None = None,
                    scrub: bool = True) -> Cleaned:
    """Quality filters (rejects -> quarantine rows), PII scrubbing, then exact + near dedup.
    ``rows`` are canonical records in priority order (ties between equal tiers keep the earlier)."""
    candidates, rejected, pii_counts = clean_rows(rows, quality, log, scrub)

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


CORPUS_COLUMNS = RECORD_COLUMNS + ("cluster_id", "pii_scrubbed")
DUP_COLUMNS = ("record_id", "source", "tier", "line_no", "duplicate_of", "kind", "similarity", "cluster_id")


def _insert_arrow(con, table_name: str, columns: tuple[str, ...], table, constants: dict) -> None:
    con.register("_part", table)
    try:
        extra = "".join(f", ${i + 1}" for i in range(len(constants)))
        con.execute(f"INSERT INTO {table_name} ({', '.join(columns + tuple(constants))}) "
                    f"SELECT {', '.join(columns)}{extra} FROM _part", list(constants.values()))
    finally:
        con.unregister("_part")


def _export_records(con, names: list[str], path: Path, batch_rows: int) -> list[tuple[str, int]]:
    """The records of ``names`` as one Parquet file of ``batch_rows``-row groups, written by DuckDB (no
    record passes through Python here), each with ``ord``: its place in the priority order (source
    order, then line) as one number, so no sort of the whole corpus is needed. Returns the (file,
    row group) batches the workers read."""
    import pyarrow.parquet as pq

    con.execute(
        f"COPY (SELECT {', '.join(RECORD_COLUMNS)}, "
        "((list_position(?::VARCHAR[], source) - 1)::BIGINT << 40) + line_no AS ord "
        f"FROM raw_records WHERE source IN (SELECT unnest(?::VARCHAR[]))) TO '{_quoted(path)}' "
        f"(FORMAT parquet, ROW_GROUP_SIZE {int(batch_rows)})", [names, names])
    groups = pq.ParquetFile(path).metadata.num_row_groups
    return [(str(path), g) for g in range(groups)]


@contextlib.contextmanager
def _exchange(db_path: Path, ray: RayOptions, run_ref: str):
    """A folder the driver and the workers share for files (removed afterwards), and a DuckDB
    memory limit for the driver while it moves them."""
    root = Path(ray.exchange_dir) if ray.exchange_dir else Path(db_path).parent / ".ray_exchange"
    folder = root / f"{run_ref}-{os.getpid()}-{time.time_ns()}"
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _quoted(path) -> str:
    return str(path).replace("'", "''")


def _insert_result(con, table_name: str, columns: tuple[str, ...], payload, constants: dict) -> None:
    """Insert a worker's result: a Parquet file it wrote (read by DuckDB) or an Arrow table."""
    if isinstance(payload, str):
        extra = "".join(f", ${i + 1}" for i in range(len(constants)))
        con.execute(f"INSERT INTO {table_name} ({', '.join(columns + tuple(constants))}) "
                    f"SELECT {', '.join(columns)}{extra} FROM read_parquet('{_quoted(payload)}')", list(constants.values()))
    elif payload.num_rows:
        _insert_arrow(con, table_name, columns, payload, constants)


def build_deduped_corpus(recipe: DataRecipe, db_path: Path, run_ref: str, log: LogFn | None = None,
                         ray: RayOptions | None = None) -> CorpusSummary:
    """Clean and deduplicate every configured source's records into ``deduped_corpus`` on the recipe's
    backend, in one transaction (a failure leaves the previous corpus as it was)."""
    start = time.perf_counter()
    names = [s.name for s in recipe.sources]
    with connect(db_path) as con:
        ensure_schema(con)
        ingest_by_source = latest_ingests(con, names)
        missing = [n for n in names if n not in ingest_by_source]
        if missing:
            raise RuntimeError(f"sources never ingested: {', '.join(missing)} (materialise their assets first)")
        n_records = con.execute("SELECT count(*) FROM raw_records WHERE source IN (SELECT unnest(?::VARCHAR[]))",
                                [names]).fetchone()[0]
        if log:
            log(f"corpus: {n_records:,} records from {len(names)} sources, {recipe.backend} backend")
        corpus_version = "cv-" + stable_hash(
            {"ingests": sorted((s, ingest_by_source[s][2]) for s in names), "quality": asdict(recipe.quality),
             "dedup": asdict(recipe.dedup)})
        stamp = {"corpus_version": corpus_version}
        began = []

        def begin() -> None:
            if not began:
                con.execute("BEGIN TRANSACTION")
                con.execute("DELETE FROM deduped_corpus")
                con.execute("DELETE FROM duplicates")
                con.execute("DELETE FROM quarantine WHERE stage = 'clean'")
                began.append(True)

        try:
            if recipe.backend == "ray":
                from sleep_pipeline.data.ray_dedup import clean_and_dedup_on_ray, ray_session

                ray = ray or RayOptions()

                def sink(kind: str, payload) -> None:
                    begin()
                    if kind == "quarantine":
                        insert_rows(con, "quarantine", QUARANTINE_COLUMNS, _quarantine_dicts(
                            [QuarantineRow(**q) for q in payload], run_ref))
                    elif kind == "kept":
                        _insert_result(con, "deduped_corpus", CORPUS_COLUMNS, payload, stamp)
                    else:
                        _insert_result(con, "duplicates", DUP_COLUMNS, payload, stamp)

                con.execute(f"SET memory_limit = '{int(ray.driver_memory_mb)}MB'")
                with _exchange(db_path, ray, run_ref) as folder, ray_session(ray.address, ray.num_cpus, log):
                    batches = _export_records(con, names, folder / "records.parquet", ray.batch_rows)
                    outcome = clean_and_dedup_on_ray(batches, recipe.quality, recipe.dedup, ray.partitions(n_records),
                                                      sink, log, out_dir=str(folder))
                begin()
                pii_counts, dedup_stats = outcome.pii_counts, outcome.stats
            else:
                rows = query_dicts(
                    con, f"SELECT {', '.join(RECORD_COLUMNS)} FROM raw_records WHERE source IN (SELECT unnest(?::VARCHAR[]))",
                    [names])
                order = {n: i for i, n in enumerate(names)}
                rows.sort(key=lambda r: (order[r["source"]], r["line_no"]))
                cleaned = clean_and_dedup(rows, recipe.quality, recipe.dedup, log)
                del rows
                begin()
                insert_rows(con, "deduped_corpus", CORPUS_COLUMNS + ("corpus_version",),
                            [{**r, **stamp} for r in cleaned.kept])
                insert_rows(con, "duplicates", DUP_COLUMNS + ("corpus_version",),
                            [{**r, **stamp} for r in cleaned.duplicates])
                insert_rows(con, "quarantine", QUARANTINE_COLUMNS, _quarantine_dicts(cleaned.rejected, run_ref))
                pii_counts, dedup_stats = cleaned.pii_counts, {**cleaned.result.stats, "backend": "local"}
                del cleaned
            summary = _summarize(con, names, ingest_by_source, corpus_version, pii_counts, dedup_stats)
            if not summary.balanced:
                raise RuntimeError(f"record accounting does not balance: {summary.per_source}")
            summary.seconds = round(time.perf_counter() - start, 2)
            stats = {k: v for k, v in asdict(summary).items() if k != "sample"}
            con.execute("INSERT INTO corpus_versions VALUES (?, ?, ?)", [corpus_version, utcnow(), json.dumps(stats)])
            con.execute("COMMIT")
        except BaseException:
            if began:
                con.execute("ROLLBACK")
            raise
    return summary


def _summarize(con, names: list[str], ingest_by_source: dict, corpus_version: str, pii_counts: dict,
               dedup_stats: dict) -> CorpusSummary:
    """The corpus summary, counted from what was written (inside the writing transaction)."""
    def by(sql: str, params: list | None = None) -> dict:
        return {row[0]: row[1] for row in con.execute(sql, params or []).fetchall()}

    kept = by("SELECT source, count(*) FROM deduped_corpus GROUP BY source")
    dups = by("SELECT source, count(*) FROM duplicates GROUP BY source")
    rejected = by("SELECT source, count(*) FROM quarantine WHERE stage = 'clean' GROUP BY source")
    per_source = {n: {"in": ingest_by_source[n][0], "kept": kept.get(n, 0),
                      "quarantined": ingest_by_source[n][1] + rejected.get(n, 0), "duplicates": dups.get(n, 0)}
                  for n in names}
    per_reason = by("SELECT reason, count(*) FROM quarantine WHERE stage = 'clean' OR (stage = 'ingest' AND "
                    "source IN (SELECT unnest(?::VARCHAR[]))) GROUP BY reason ORDER BY reason", [names])
    per_bucket = by("SELECT bucket, count(*) FROM deduped_corpus GROUP BY bucket ORDER BY bucket")
    kinds = by("SELECT kind, count(*) FROM duplicates GROUP BY kind")
    n_kept, n_dups = sum(kept.values()), sum(dups.values())
    step = max(n_kept // 8, 1)
    sample = query_dicts(
        con, "SELECT record_id, bucket, tier, prompt, response FROM (SELECT *, row_number() OVER (ORDER BY "
             "list_position(?::VARCHAR[], source), line_no) - 1 AS rn FROM deduped_corpus) WHERE rn % ? = 0 "
             "ORDER BY rn LIMIT 8", [names, step])
    return CorpusSummary(
        corpus_version=corpus_version,
        records_in=sum(v["in"] for v in per_source.values()),
        kept=n_kept,
        quarantined=sum(v["quarantined"] for v in per_source.values()),
        duplicates=n_dups,
        exact_duplicates=kinds.get("exact", 0),
        near_duplicates=kinds.get("near", 0),
        duplicate_rate=n_dups / max(n_kept + n_dups, 1),
        pii_scrubbed=pii_counts,
        per_source=per_source,
        per_reason=per_reason,
        per_bucket=per_bucket,
        dedup_stats=dedup_stats,
        seconds=0.0,
        sample=sample,
    )
