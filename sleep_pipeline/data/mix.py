"""The tiered data mix: per-bucket sampling weighted by source tier, replay, splits, a versioned manifest.

Each bucket gets ``ratio * n_fresh`` examples, drawn without replacement with probability
proportional to the record's tier weight (Efraimidis-Spirakis keys from a seeded RNG). Hard examples
from the replay table (fed by gate failures) join the train split, capped. Splits are a hash of the
record's near-duplicate *cluster*, so two copies of one text can never sit in two splits. The mix is
written to DuckDB (``data_mix``, ``data_versions``) and as JSONL files per split for the trainer.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path

from sleep_pipeline.config import SPLITS, DataRecipe, MixConfig, stable_hash
from sleep_pipeline.progress import LogFn
from sleep_pipeline.store import connect, ensure_schema, insert_rows, query_dicts, table_exists, utcnow

MIX_COLUMNS = ("version_id", "split", "record_id", "cluster_id", "bucket", "tier", "source", "origin",
               "system", "prompt", "response", "meta")
REPLAY_TABLE = "hard_example_replay"


def split_of(cluster_id: str, seed: int, ratios: dict[str, float]) -> str:
    u = zlib.crc32(f"{seed}:{cluster_id}".encode()) / 2**32
    acc = 0.0
    for split in SPLITS:
        acc += ratios.get(split, 0.0)
        if u < acc:
            return split
    return "train"


def _weighted_sample(rows: list[dict], n: int, weights: dict[int, float], rng: random.Random) -> list[dict]:
    """n rows without replacement, P(row) proportional to its tier weight (zero weight: never)."""
    keyed = []
    for r in rows:
        w = weights.get(r["tier"], 0.0)
        if w > 0:
            keyed.append((rng.random() ** (1.0 / w), r["record_id"], r))
    keyed.sort(key=lambda k: (-k[0], k[1]))
    return [r for _, _, r in keyed[:n]]


def plan_bucket_counts(available: dict[str, int], mix: MixConfig, n_fresh: int | None) -> dict[str, int]:
    """Examples per bucket. With no total, the largest total every bucket can fill exactly."""
    if n_fresh is None:
        n_fresh = min(
            (math.floor(available.get(b, 0) / r) for b, r in mix.bucket_ratios.items() if r > 0), default=0
        )
    return {b: min(round(r * n_fresh), available.get(b, 0)) for b, r in mix.bucket_ratios.items() if r > 0}


def build_mix(corpus: list[dict], replay: list[dict], mix: MixConfig) -> tuple[list[dict], dict]:
    """Rows of the mix (with ``split`` and ``origin``) and the facts for the manifest."""
    rng = random.Random(mix.seed)
    by_bucket: dict[str, list[dict]] = {}
    for r in sorted(corpus, key=lambda r: r["record_id"]):
        if mix.tier_weights.get(r["tier"], 0.0) > 0:
            by_bucket.setdefault(r["bucket"], []).append(r)
    available = {b: len(v) for b, v in by_bucket.items()}
    if mix.total_examples is not None:
        replay_n = min(mix.replay_cap, round(mix.replay_ratio * mix.total_examples), len(replay))
        counts = plan_bucket_counts(available, mix, mix.total_examples - replay_n)
    else:
        counts = plan_bucket_counts(available, mix, None)
        fresh = sum(counts.values())
        replay_n = min(mix.replay_cap, round(mix.replay_ratio * fresh / max(1 - mix.replay_ratio, 1e-9)), len(replay))

    rows: list[dict] = []
    for bucket in sorted(counts):
        for r in _weighted_sample(by_bucket.get(bucket, []), counts[bucket], mix.tier_weights, rng):
            rows.append({**r, "split": split_of(r["cluster_id"], mix.seed, mix.split_ratios), "origin": "fresh"})
    for r in rng.sample(sorted(replay, key=lambda r: r["record_id"]), replay_n):
        rows.append({**r, "split": "train", "origin": "replay"})
    rng.shuffle(rows)
    facts = {
        "available_per_bucket": available,
        "requested_per_bucket": {b: round(r * sum(counts.values())) for b, r in mix.bucket_ratios.items()},
        "replay": {"ratio": mix.replay_ratio, "cap": mix.replay_cap, "available": len(replay), "taken": replay_n},
    }
    return rows, facts


def _count(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out[str(r[key])] = out.get(str(r[key]), 0) + 1
    return dict(sorted(out.items()))


def bucket_shares(manifest: dict) -> dict[str, dict[str, float]]:
    """Target vs actual share of each bucket among the fresh (non-replay) examples."""
    fresh = manifest["counts"]["fresh_per_bucket"]
    total = sum(fresh.values())
    return {
        b: {"target": r, "actual": (fresh.get(b, 0) / total) if total else 0.0}
        for b, r in manifest["bucket_ratios"].items()
    }


def check_bucket_ratios(manifest: dict, tolerance: float) -> tuple[bool, dict[str, dict[str, float]]]:
    shares = bucket_shares(manifest)
    ok = bool(shares) and all(abs(v["actual"] - v["target"]) <= tolerance for v in shares.values())
    return ok, shares


def materialize_mix(recipe: DataRecipe, db_path: Path, mixes_dir: Path, log: LogFn | None = None) -> dict:
    """Build the mix from ``deduped_corpus`` (+ replay table), persist it, return the manifest."""
    with connect(db_path) as con:
        ensure_schema(con)
        corpus = query_dicts(
            con, "SELECT record_id, cluster_id, bucket, tier, source, system, prompt, response, meta, corpus_version FROM deduped_corpus")
        replay = []
        if table_exists(con, REPLAY_TABLE):
            replay = query_dicts(
                con, f"SELECT example_id AS record_id, example_id AS cluster_id, bucket, 1 AS tier, 'replay' AS source, "
                     f"coalesce(system, '') AS system, prompt, response, coalesce(meta, '{{}}') AS meta FROM {REPLAY_TABLE}")
        parent = con.execute("SELECT version_id FROM data_versions ORDER BY created_at DESC LIMIT 1").fetchone()
    if not corpus:
        raise RuntimeError("deduped_corpus is empty: nothing to mix (materialise deduped_corpus first)")
    corpus_version = corpus[0]["corpus_version"]
    rows, facts = build_mix(corpus, replay, recipe.mix)
    config_hash = stable_hash(asdict(recipe.mix))
    version_id = "dv-" + stable_hash({"corpus": corpus_version, "mix": config_hash, "replay": sorted(r["record_id"] for r in replay)})
    parent_version = parent[0] if parent else None
    if parent_version == version_id:  # same inputs, same mix: keep the lineage it already had
        with connect(db_path) as con:
            row = con.execute("SELECT parent_version FROM data_versions WHERE version_id = ?", [version_id]).fetchone()
        parent_version = row[0] if row else None

    out_dir = mixes_dir / version_id
    tmp_dir = mixes_dir / f".{version_id}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    files = {}
    for split in SPLITS:
        path = tmp_dir / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for r in rows:
                if r["split"] == split:
                    fh.write(json.dumps({k: r[k] for k in ("record_id", "bucket", "tier", "source", "origin", "system", "prompt", "response", "meta")}, ensure_ascii=False) + "\n")
        files[split] = str(out_dir / f"{split}.jsonl")
    fresh = [r for r in rows if r["origin"] == "fresh"]
    manifest = {
        "version_id": version_id,
        "parent_version": parent_version,
        "corpus_version": corpus_version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash,
        "recipe_hash": recipe.config_hash(),
        "total": len(rows),
        "counts": {
            "per_bucket": _count(rows, "bucket"),
            "fresh_per_bucket": _count(fresh, "bucket"),
            "per_tier": _count(rows, "tier"),
            "per_source": _count(rows, "source"),
            "per_split": _count(rows, "split"),
            "per_origin": _count(rows, "origin"),
        },
        "bucket_ratios": recipe.mix.bucket_ratios,
        "tier_weights": {str(k): v for k, v in recipe.mix.tier_weights.items()},
        "split_ratios": recipe.mix.split_ratios,
        "split_by": "near-duplicate cluster (crc32 of seed and cluster id)",
        "seed": recipe.mix.seed,
        "filters_applied": {
            "quality": asdict(recipe.quality),
            "dedup": {**asdict(recipe.dedup), "lsh_bands_rows": list(recipe.dedup.lsh_bands())},
            "pii_scrubbed_entities": list(recipe.quality.pii_entities),
        },
        **facts,
        "files": files,
    }
    (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)

    with connect(db_path) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM data_mix WHERE version_id = ?", [version_id])
        con.execute("DELETE FROM data_versions WHERE version_id = ?", [version_id])
        insert_rows(con, "data_mix", MIX_COLUMNS, [{**r, "version_id": version_id} for r in rows])
        con.execute(
            "INSERT INTO data_versions VALUES (?, ?, ?, ?, ?, ?)",
            [version_id, parent_version, corpus_version, config_hash, utcnow(), json.dumps(manifest)],
        )
        old = [v for (v,) in con.execute(
            "SELECT version_id FROM data_versions ORDER BY created_at DESC OFFSET ?", [recipe.keep_versions]
        ).fetchall()]
        for v in old:
            con.execute("DELETE FROM data_mix WHERE version_id = ?", [v])
        con.execute("COMMIT")
    for v in old:  # the manifest row stays for lineage; the bulky rows and files go
        shutil.rmtree(mixes_dir / v, ignore_errors=True)
    if log:
        log(f"mix {version_id}: {len(rows):,} examples {manifest['counts']['per_split']}")
    return manifest


def latest_manifest(db_path: Path) -> dict | None:
    with connect(db_path) as con:
        ensure_schema(con)
        row = con.execute("SELECT manifest FROM data_versions ORDER BY created_at DESC LIMIT 1").fetchone()
    return json.loads(row[0]) if row else None
