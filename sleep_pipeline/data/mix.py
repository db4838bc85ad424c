"""The tiered data mix: per-bucket sampling weighted by source tier, replay, splits, a versioned manifest.

Each bucket gets ``ratio * total`` examples. Hard examples from the replay table (fed by gate
failures, see :mod:`sleep_pipeline.data.replay`) are drawn first, stratified across buckets, capped
per bucket and in all, least-replayed first; they join the train split and count toward their
bucket's share, and fresh records fill the rest of each bucket, drawn without replacement with
probability proportional to the record's tier weight (Efraimidis-Spirakis keys from a seeded RNG).
Splits are a hash of the record's near-duplicate *cluster*, so two copies of one text can never sit
in two splits. The mix is written to DuckDB (``data_mix``, ``data_versions``) and as JSONL files per
split for the trainer; the replay rows it took are counted in the same transaction.
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
from sleep_pipeline.data.replay import (REPLAY_TABLE, count_by, counts_before, draw, mark_replayed, replay_pool,
                                         times_replayed_histogram)
from sleep_pipeline.progress import LogFn
from sleep_pipeline.store import connect, ensure_schema, insert_rows, query_dicts, utcnow

MIX_COLUMNS = ("version_id", "split", "record_id", "cluster_id", "bucket", "tier", "source", "origin",
               "system", "prompt", "response", "meta")
__all__ = ["REPLAY_TABLE", "build_mix", "plan_mix", "bucket_shares", "check_bucket_ratios", "materialize_mix",
           "latest_manifest", "split_of"]


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


def apportion(total: int, ratios: dict[str, float]) -> dict[str, int]:
    """``total`` split over the buckets with a positive ratio, largest remainder first (sums to total)."""
    ratios = {b: r for b, r in ratios.items() if r > 0}
    norm = sum(ratios.values()) or 1.0
    exact = {b: total * r / norm for b, r in ratios.items()}
    out = {b: math.floor(x) for b, x in exact.items()}
    for b in sorted(exact, key=lambda b: (out[b] - exact[b], b))[: total - sum(out.values())]:
        out[b] += 1
    return out


def plan_mix(available: dict[str, int], replay: list[dict], mix: MixConfig) -> tuple[dict[str, int], list[dict], dict[str, int]]:
    """(fresh examples per bucket, replay rows taken, target per bucket).

    Replay rows count toward their bucket's target (``ratio * total``): they are drawn first (at most
    ``replay_ratio * total`` and ``replay_cap`` in all, the per-bucket cap and the bucket's target per
    bucket, only from buckets in the mix) and fresh records fill the rest. With no total, the total is
    the largest every bucket can fill from fresh records, plus the replay share on top (shrunk when a
    bucket cannot fill its share of that)."""
    ratios = {b: r for b, r in mix.bucket_ratios.items() if r > 0}
    eligible = [r for r in replay if r["bucket"] in ratios]
    if mix.total_examples is not None:
        total = mix.total_examples
        budget = min(mix.replay_cap, round(mix.replay_ratio * total), len(eligible))
    else:
        fresh_only = min((math.floor(available.get(b, 0) / r) for b, r in ratios.items()), default=0)
        budget = min(mix.replay_cap, round(mix.replay_ratio * fresh_only / max(1 - mix.replay_ratio, 1e-9)), len(eligible))
        total = fresh_only + budget
    targets = apportion(total, ratios)
    taken = draw(eligible, budget, {b: min(mix.replay_bucket_cap(), t) for b, t in targets.items()}, mix.seed)
    if mix.total_examples is None and taken:
        per_bucket = count_by(taken, "bucket")
        fillable = min(math.floor((available.get(b, 0) + per_bucket.get(b, 0)) / r) for b, r in ratios.items())
        if fillable < total:
            targets = apportion(fillable, ratios)
            seen: dict[str, int] = {}
            trimmed = []
            for r in taken:  # draw order is preference order within a bucket: the last ones go
                seen[r["bucket"]] = seen.get(r["bucket"], 0) + 1
                if seen[r["bucket"]] <= targets[r["bucket"]]:
                    trimmed.append(r)
            taken = trimmed
    replay_per_bucket = count_by(taken, "bucket")
    fresh = {b: min(max(t - replay_per_bucket.get(b, 0), 0), available.get(b, 0)) for b, t in targets.items()}
    return fresh, taken, targets


def build_mix(corpus: list[dict], replay: list[dict], mix: MixConfig) -> tuple[list[dict], dict]:
    """Rows of the mix (with ``split`` and ``origin``) and the facts for the manifest. Replay rows may
    carry ``times_replayed`` (absent: never replayed)."""
    rng = random.Random(mix.seed)
    by_bucket: dict[str, list[dict]] = {}
    for r in sorted(corpus, key=lambda r: r["record_id"]):
        if mix.tier_weights.get(r["tier"], 0.0) > 0:
            by_bucket.setdefault(r["bucket"], []).append(r)
    available = {b: len(v) for b, v in by_bucket.items()}
    counts, taken, targets = plan_mix(available, replay, mix)

    rows: list[dict] = []
    for bucket in sorted(counts):
        for r in _weighted_sample(by_bucket.get(bucket, []), counts[bucket], mix.tier_weights, rng):
            rows.append({**r, "split": split_of(r["cluster_id"], mix.seed, mix.split_ratios), "origin": "fresh"})
    for r in taken:
        rows.append({**r, "split": "train", "origin": "replay"})
    rng.shuffle(rows)
    facts = {
        "available_per_bucket": available,
        "requested_per_bucket": targets,
        "replay": {
            "ratio": mix.replay_ratio, "cap": mix.replay_cap, "per_bucket_cap": mix.replay_bucket_cap(),
            "available": len(replay), "available_per_bucket": count_by(replay, "bucket"),
            "not_in_mix": sum(1 for r in replay if r["bucket"] not in targets),
            "taken": len(taken), "taken_per_bucket": count_by(taken, "bucket"),
            # times each row had been replayed before this version: the rows taken, and the whole pool
            "times_replayed_taken": times_replayed_histogram(taken),
            "times_replayed_pool": times_replayed_histogram(replay),
        },
    }
    return rows, facts


def bucket_shares(manifest: dict) -> dict[str, dict[str, float]]:
    """Target vs actual share of each bucket among all rows of the mix, fresh and replay together
    (replay rows count toward their bucket), with the two counts apart. A bucket in the mix without a
    ratio has target 0."""
    counts = manifest["counts"]
    fresh = counts["fresh_per_bucket"]
    replay = counts.get("replay_per_bucket")
    if replay is None:  # a manifest from before replay was counted per bucket: the rest of per_bucket
        replay = {b: n - fresh.get(b, 0) for b, n in counts.get("per_bucket", {}).items() if n > fresh.get(b, 0)}
    total = sum(fresh.values()) + sum(replay.values())
    targets = {**dict.fromkeys(sorted({*fresh, *replay}), 0.0), **manifest["bucket_ratios"]}
    return {
        b: {"target": r, "actual": ((fresh.get(b, 0) + replay.get(b, 0)) / total) if total else 0.0,
            "fresh": fresh.get(b, 0), "replay": replay.get(b, 0)}
        for b, r in targets.items()
    }


def check_bucket_ratios(manifest: dict, tolerance: float) -> tuple[bool, dict[str, dict[str, float]]]:
    """Every bucket's share of the whole mix (fresh + replay) within ``tolerance`` of its ratio."""
    shares = bucket_shares(manifest)
    ok = bool(shares) and all(abs(v["actual"] - v["target"]) <= tolerance for v in shares.values())
    return ok, shares


def materialize_mix(recipe: DataRecipe, db_path: Path, mixes_dir: Path, log: LogFn | None = None) -> dict:
    """Build the mix from ``deduped_corpus`` (+ replay table), persist it, return the manifest."""
    with connect(db_path) as con:
        ensure_schema(con)
        corpus = query_dicts(
            con, "SELECT record_id, cluster_id, bucket, tier, source, system, prompt, response, meta, corpus_version FROM deduped_corpus")
        pool = replay_pool(con)
        parent = query_dicts(con, "SELECT version_id FROM data_versions ORDER BY created_at DESC LIMIT 1")
    if not corpus:
        raise RuntimeError("deduped_corpus is empty: nothing to mix (materialise deduped_corpus first)")
    corpus_version = corpus[0]["corpus_version"]
    config_hash = stable_hash(asdict(recipe.mix))
    parent_version = parent[0]["version_id"] if parent else None

    def version_of(replay: list[dict]) -> str:
        return "dv-" + stable_hash({"corpus": corpus_version, "mix": config_hash,
                                    "replay": sorted([r["record_id"], r["times_replayed"]] for r in replay)})

    # The replay counts are an input (least-replayed rows go first) that the mix itself changes. The
    # same inputs as the newest version, before that version counted its rows, are that version again:
    # same rows, nothing counted twice. Otherwise the counts as they stand make a new version.
    replay, version_id = pool, version_of(pool)
    if parent_version is not None and version_of(counts_before(pool, parent_version)) == parent_version:
        replay, version_id = counts_before(pool, parent_version), parent_version
    rows, facts = build_mix(corpus, replay, recipe.mix)
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
    replayed = [r for r in rows if r["origin"] == "replay"]
    manifest = {
        "version_id": version_id,
        "parent_version": parent_version,
        "corpus_version": corpus_version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_hash": config_hash,
        "recipe_hash": recipe.config_hash(),
        "total": len(rows),
        "counts": {
            "per_bucket": count_by(rows, "bucket"),
            "fresh_per_bucket": count_by(fresh, "bucket"),
            "replay_per_bucket": count_by(replayed, "bucket"),
            "per_tier": count_by(rows, "tier"),
            "per_source": count_by(rows, "source"),
            "per_split": count_by(rows, "split"),
            "per_origin": count_by(rows, "origin"),
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
        mark_replayed(con, version_id, [r["record_id"] for r in replayed])
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


def manifest_of(db_path: Path, version_id: str) -> dict:
    """The manifest of one data version (what a candidate was trained on), not "the newest"."""
    with connect(db_path) as con:
        ensure_schema(con)
        rows = con.execute("SELECT manifest FROM data_versions WHERE version_id = ?", [version_id]).fetchall()
    if not rows:
        raise KeyError(f"unknown data version {version_id!r}")
    return json.loads(rows[0][0])


def latest_manifest(db_path: Path) -> dict | None:
    with connect(db_path) as con:
        ensure_schema(con)
        row = con.execute("SELECT manifest FROM data_versions ORDER BY created_at DESC LIMIT 1").fetchone()
    return json.loads(row[0]) if row else None
