"""Data hygiene assets: one raw asset per source, ``deduped_corpus`` and ``tiered_data_mix``.

Each asset body calls one engine function and turns its summary into metadata; the blocking checks
re-read what was written to DuckDB, so a mix that is empty or off its bucket ratios stops the run
before anything trains on it.
"""

import json

import dagster as dg

from assets.lineage import cycle_metadata, recorded
from assets.policies import IO_RETRY
from resources.ray_cluster import RayClusterResource
from resources.storage import DataRecipeResource, StorageResource
from sleep_pipeline.config import DataRecipe, SourceConfig
from sleep_pipeline.data.corpus import build_deduped_corpus, ingest_source
from sleep_pipeline.data.mix import bucket_shares, check_bucket_ratios, manifest_of, materialize_mix
from sleep_pipeline.store import connect, ensure_schema, latest_ingests

DATA_GROUP = "learn_data"
SOURCE_GROUP = "sources"
RAY_POOL = "sleep_pipeline_ray"  # data steps on the Ray backend (limit in dagster.yaml: pools)

def _md_table(headers: list[str], rows: list[list]) -> dg.MetadataValue:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ")[:120] for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return dg.MetadataValue.md("\n".join(lines))

def _shares_table(shares: dict[str, dict], available: dict[str, int]) -> dg.MetadataValue:
    """Each bucket's share of the whole mix against its target, with fresh and replay rows apart."""
    return _md_table(
        ["bucket", "examples", "fresh", "replay", "target share", "actual share", "available"],
        [[b, v["fresh"] + v["replay"], v["fresh"], v["replay"], f"{v['target']:.3f}", f"{v['actual']:.3f}",
          available.get(b, 0)] for b, v in shares.items()],
    )

def source_key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["raw", name])

def _source_asset(src: SourceConfig, pool: str | None) -> dg.AssetsDefinition:
    @dg.asset(
        pool=pool,
        key=source_key(src.name),
        group_name=SOURCE_GROUP,
        description=src.description or f"Raw records of source {src.name!r} (tier {src.tier}).",
        metadata={"tier": src.tier, "path": str(src.path), "format": src.format,
                  "bucket": src.bucket or f"from field {src.bucket_field!r}"},
        tags={"tier": str(src.tier)},
        kinds={"duckdb", src.format},
        retry_policy=IO_RETRY,
    )
    def _ingest(context: dg.AssetExecutionContext, storage: StorageResource, data_recipe: DataRecipeResource,
                ray_cluster: RayClusterResource) -> dg.MaterializeResult:
        recipe = data_recipe.load(storage)
        summary = ingest_source(recipe.source(src.name), recipe, storage.db_path, context.run.run_id, log=context.log.info,
                                ray=ray_cluster.options())
        if summary.quarantined:
            context.log.warning(f"{src.name}: {summary.quarantined} records quarantined: {summary.reasons}")
        return dg.MaterializeResult(metadata={
            "dagster/row_count": summary.records_ok,
            "lines_in": summary.lines_in,
            "quarantined": summary.quarantined,
            "quarantine_reasons": _md_table(["reason", "records"], sorted(summary.reasons.items())),
            "records_per_bucket": _md_table(["bucket", "records"], sorted(summary.buckets.items())),
            "tier": summary.tier,
            "content_sha256": summary.content_sha256,
            "path": dg.MetadataValue.path(summary.path),
            "generated_embedded_default": summary.generated,
        })

    return _ingest

def build_data_assets(recipe: DataRecipe) -> tuple[list, list]:
    """(assets, asset checks) of the data phase for the configured sources."""
    # On Ray without an address every step starts its own local cluster: one such step at a time.
    pool = RAY_POOL if recipe.backend == "ray" else None
    source_assets = [_source_asset(s, pool) for s in recipe.sources]

    @dg.asset(
        group_name=DATA_GROUP,
        pool=pool,
        deps=[source_key(s.name) for s in recipe.sources],
        kinds={"duckdb"},
        description="All sources cleaned (quality filters, PII scrubbed) and deduplicated (exact + MinHash LSH); "
                    "the most trusted copy of each duplicate cluster is kept.",
    )
    def deduped_corpus(context: dg.AssetExecutionContext, storage: StorageResource, data_recipe: DataRecipeResource,
                       ray_cluster: RayClusterResource) -> dg.MaterializeResult:
        recipe = data_recipe.load(storage)
        s = build_deduped_corpus(recipe, storage.db_path, context.run.run_id, log=context.log.info,
                                 ray=ray_cluster.options())
        return dg.MaterializeResult(metadata={
            "backend": recipe.backend,
            "dagster/row_count": s.kept,
            "records_in": s.records_in,
            "kept": s.kept,
            "quarantined": s.quarantined,
            "duplicates": s.duplicates,
            "exact_duplicates": s.exact_duplicates,
            "near_duplicates": s.near_duplicates,
            "duplicate_rate": round(s.duplicate_rate, 4),
            "corpus_version": s.corpus_version,
            "per_source": _md_table(
                ["source", "in", "kept", "quarantined", "duplicates"],
                [[k, v["in"], v["kept"], v["quarantined"], v["duplicates"]] for k, v in s.per_source.items()],
            ),
            "quarantine_reasons": _md_table(["reason", "records"], list(s.per_reason.items())),
            "kept_per_bucket": _md_table(["bucket", "records"], list(s.per_bucket.items())),
            "pii_scrubbed": _md_table(["entity", "spans"], sorted(s.pii_scrubbed.items())),
            "dedup": dg.MetadataValue.json(s.dedup_stats),
            "sample": _md_table(["record_id", "bucket", "tier", "prompt", "response"],
                                [[r["record_id"], r["bucket"], r["tier"], r["prompt"][:80], r["response"][:60]] for r in s.sample]),
            "seconds": s.seconds,
        })

    @dg.asset_check(asset=deduped_corpus, blocking=True, description="Records in = kept + quarantined + duplicates.")
    def records_accounted_for(storage: StorageResource, data_recipe: DataRecipeResource) -> dg.AssetCheckResult:
        names = [s.name for s in data_recipe.load(storage).sources]
        with connect(storage.db_path) as con:
            ensure_schema(con)
            lines_in = sum(lines for lines, _, _ in latest_ingests(con, names).values())
            kept = con.execute("SELECT count(*) FROM deduped_corpus").fetchone()[0]
            dups = con.execute("SELECT count(*) FROM duplicates").fetchone()[0]
            quarantined = con.execute(
                "SELECT count(*) FROM quarantine WHERE stage = 'clean' OR (stage = 'ingest' AND source IN (SELECT unnest(?::VARCHAR[])))",
                [names]).fetchone()[0]
        return dg.AssetCheckResult(
            passed=bool(lines_in == kept + dups + quarantined and lines_in > 0),
            metadata={"records_in": lines_in, "kept": kept, "duplicates": dups, "quarantined": quarantined},
        )

    @dg.asset(
        group_name=DATA_GROUP,
        deps=[deduped_corpus],
        kinds={"duckdb", "jsonl"},
        description="Seeded, tier-weighted sample per task bucket plus capped hard-example replay, split by "
                    "near-duplicate cluster into train/validation/test; a versioned data manifest.",
    )
    def tiered_data_mix(context: dg.AssetExecutionContext, storage: StorageResource, data_recipe: DataRecipeResource) -> dg.MaterializeResult:
        recipe = data_recipe.load(storage)
        m = materialize_mix(recipe, storage.db_path, storage.mixes_dir, log=context.log.info)
        shares = bucket_shares(m)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": m["total"],
                "version_id": m["version_id"],
                "parent_version": m["parent_version"] or "",
                "corpus_version": m["corpus_version"],
                "config_hash": m["config_hash"],
                "buckets": _shares_table(shares, m["available_per_bucket"]),
                "per_split": _md_table(["split", "examples"], list(m["counts"]["per_split"].items())),
                "per_tier": _md_table(["tier", "examples"], list(m["counts"]["per_tier"].items())),
                "per_source": _md_table(["source", "examples"], list(m["counts"]["per_source"].items())),
                "replay": dg.MetadataValue.json(m["replay"]),
                "train_file": dg.MetadataValue.path(m["files"]["train"]),
                "manifest": dg.MetadataValue.json(m),
                **cycle_metadata(context),
            },
        )

    @dg.asset_check(asset=tiered_data_mix, blocking=True, description="The mix has examples in every split it is configured for.")
    def mix_not_empty(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        m = manifest_of(storage.db_path, recorded(context, "tiered_data_mix", "version_id"))
        per_split = (m or {}).get("counts", {}).get("per_split", {})
        wanted = [s for s, r in (m or {}).get("split_ratios", {}).items() if r > 0]
        empty = [s for s in wanted if per_split.get(s, 0) == 0]
        return dg.AssetCheckResult(
            passed=bool(m and m["total"] > 0 and not empty),
            metadata={"total": (m or {}).get("total", 0), "empty_splits": ", ".join(empty) or "none",
                      "per_split": dg.MetadataValue.json(per_split)},
        )

    @dg.asset_check(asset=tiered_data_mix, blocking=True, description="Each bucket's share is within the recipe's tolerance of its ratio.")
    def bucket_ratios_within_tolerance(context: dg.AssetCheckExecutionContext, storage: StorageResource,
                                       data_recipe: DataRecipeResource) -> dg.AssetCheckResult:
        tolerance = data_recipe.load(storage).mix.ratio_tolerance
        m = manifest_of(storage.db_path, recorded(context, "tiered_data_mix", "version_id"))
        ok, shares = check_bucket_ratios(m, tolerance)
        off = {b: round(v["actual"] - v["target"], 4) for b, v in shares.items() if abs(v["actual"] - v["target"]) > tolerance}
        return dg.AssetCheckResult(
            passed=ok,
            metadata={"tolerance": tolerance, "off_by_more": dg.MetadataValue.json(off),
                      "buckets": _shares_table(shares, m.get("available_per_bucket", {})),
                      "shares": dg.MetadataValue.json(shares), "version_id": m["version_id"]},
        )

    return (source_assets + [deduped_corpus, tiered_data_mix],
            [records_accounted_for, mix_not_empty, bucket_ratios_within_tolerance])
