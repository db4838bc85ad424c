"""The data recipes (``sources.yaml``, ``data.yaml``) parsed into validated dataclasses.

Configuration is data: each recipe file is read, checked field by field with the shared toolkit of
:mod:`sleep_pipeline.recipe_checks`, and turned into frozen dataclasses. A bad value raises
:class:`RecipeError` naming the file and the field path (``sources[2].format``), so a mistake stops the
code location from loading instead of surfacing deep inside a later step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# RecipeError and stable_hash are imported from here throughout the project: keep them re-exported.
from sleep_pipeline.recipe_checks import (RecipeError, check_keys, fail, get, in_file, in_range, mapping, number,
                                          one_of, read_yaml, section, stable_hash)

# The five task buckets of the data-hygiene design plus the long-context and safety buckets the gate
# suites rely on. Every record of every source lands in exactly one of them.
TASK_BUCKETS = ("basic_recognition", "reasoning", "planning", "tool_use", "structured_output")
BUCKETS = TASK_BUCKETS + ("long_context", "safety", "benign")
SOURCE_FORMATS = ("jsonl", "parquet", "txt_dir")
TIERS = (1, 2, 3)
RECORD_FIELDS = ("id", "system", "prompt", "response", "text", "meta")


# --------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class SourceConfig:
    name: str
    path: Path
    format: str
    tier: int
    bucket: str | None = None  # every record goes to this bucket ...
    bucket_field: str | None = None  # ... or the bucket is read from this record field
    bucket_map: dict[str, str] = field(default_factory=dict)  # field value -> bucket
    fields: dict[str, str] = field(default_factory=dict)  # record field -> field in the file
    generator: str | None = None  # embedded default: generated offline when the file is absent
    description: str = ""

    def field_name(self, canonical: str) -> str:
        return self.fields.get(canonical, canonical)


GENERATORS = ("curated_tasks", "tool_calls", "structured_output", "long_context", "safety", "general_helpful",
              "reposts")


def _parse_source(raw: Any, where: str, base_dir: Path, storage_dir: Path) -> SourceConfig:
    mapping(raw, where, SourceConfig)
    name = get(raw, "name", where, str)
    if not name.isidentifier():
        raise fail(f"{where}.name", f"must be a plain identifier (letters, digits, _), got {name!r}")
    fmt = one_of(get(raw, "format", where, str), SOURCE_FORMATS, f"{where}.format", "format")
    tier = get(raw, "tier", where, int)
    if tier not in TIERS:
        raise fail(f"{where}.tier", f"must be 1 (curated first-party), 2 or 3 (scraped/reposted), got {tier}")
    generator = get(raw, "generator", where, str, None)
    if generator is not None:
        one_of(generator, GENERATORS, f"{where}.generator", "generator")
    path_text = get(raw, "path", where, str).replace("{storage}", str(storage_dir))
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if generator is None and not path.exists():
        raise fail(f"{where}.path", f"{path} does not exist")
    if generator is None and fmt == "txt_dir" and not path.is_dir():
        raise fail(f"{where}.path", f"{path} must be a folder of .txt files for format txt_dir")

    bucket = get(raw, "bucket", where, str, None)
    bucket_field = get(raw, "bucket_field", where, str, None)
    if (bucket is None) == (bucket_field is None):
        raise fail(f"{where}.bucket", "give exactly one of `bucket` (all records) or `bucket_field`")
    if bucket is not None:
        one_of(bucket, BUCKETS, f"{where}.bucket", "bucket")
    bucket_map = get(raw, "bucket_map", where, dict, {})
    for key, value in bucket_map.items():
        one_of(value, BUCKETS, f"{where}.bucket_map.{key}", "bucket")
    fields = get(raw, "fields", where, dict, {})
    for key, value in fields.items():
        if key not in RECORD_FIELDS:
            raise fail(f"{where}.fields.{key}", f"unknown record field (known: {', '.join(RECORD_FIELDS)})")
        if not isinstance(value, str):
            raise fail(f"{where}.fields.{key}", "must name a field of the source file")
    return SourceConfig(
        name=name, path=path, format=fmt, tier=tier, bucket=bucket, bucket_field=bucket_field,
        bucket_map={str(k): str(v) for k, v in bucket_map.items()}, fields=dict(fields),
        generator=generator, description=get(raw, "description", where, str, ""),
    )


# ------------------------------------------------------------------------------ cleaning & dedup
PII_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "CREDIT_CARD", "API_KEY")


@dataclass(frozen=True)
class QualityConfig:
    min_chars: int = 2
    max_chars: int = 60_000
    max_record_bytes: int = 1_000_000  # larger lines are quarantined before they are even decoded
    max_repetition: float = 0.7  # share of repeated word 3-grams above which a text is "repetitive"
    max_garbage: float = 0.1  # share of control / replacement / unassigned characters
    pii_entities: tuple[str, ...] = PII_ENTITIES


DATA_BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.8  # Jaccard similarity of word shingles at which two texts are near-duplicates
    num_perm: int = 128
    shingle_size: int = 5  # words per shingle
    seed: int = 1
    bands: int | None = None  # LSH bands; None picks them from threshold and num_perm
    # Shingles found in the request part (prompt) of more than this share of documents are template
    # text and not compared; the answer and plain documents are always compared in full. 1.0: never.
    boilerplate_doc_share: float = 0.01

    def lsh_bands(self) -> tuple[int, int]:
        """(bands, rows) for the LSH index. The default favours recall: a candidate pair costs one
        exact Jaccard check, a missed pair is a duplicate that leaks into training."""
        if self.bands is not None:
            return self.bands, self.num_perm // self.bands
        best = None
        for rows in range(1, self.num_perm + 1):
            if self.num_perm % rows:
                continue
            bands = self.num_perm // rows
            p_hit = 1 - (1 - self.threshold**rows) ** bands  # recall for a pair exactly at threshold
            p_noise = 1 - (1 - 0.3**rows) ** bands  # candidate rate for an unrelated-but-similar pair
            if p_hit >= 0.99 and (best is None or p_noise < best[0]):
                best = (p_noise, bands, rows)
        if best is None:
            return self.num_perm, 1
        return best[1], best[2]


# ------------------------------------------------------------------------------------------ mix
@dataclass(frozen=True)
class MixConfig:
    seed: int
    bucket_ratios: dict[str, float]
    tier_weights: dict[int, float]
    split_ratios: dict[str, float]
    total_examples: int | None = None  # None: as many as every bucket can fill without repeats
    replay_ratio: float = 0.0
    replay_cap: int = 0
    replay_per_bucket_cap: int | None = None  # None: replay_cap split evenly over the buckets in the mix
    ratio_tolerance: float = 0.02

    def replay_bucket_cap(self) -> int:
        """Replay examples one bucket may contribute: ``replay_per_bucket_cap``, or when unset the overall
        cap split evenly over the buckets with a positive ratio, rounded up."""
        if self.replay_per_bucket_cap is not None:
            return self.replay_per_bucket_cap
        buckets = sum(1 for r in self.bucket_ratios.values() if r > 0)
        return math.ceil(self.replay_cap / buckets) if buckets else 0


SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DataRecipe:
    sources: tuple[SourceConfig, ...]
    quality: QualityConfig
    dedup: DedupConfig
    mix: MixConfig
    keep_versions: int = 5
    backend: str = "local"  # where cleaning and dedup run: "local" (this process) or "ray" (a Ray cluster)

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def config_hash(self) -> str:
        d = asdict(self)
        d.pop("backend")  # both backends give the same records
        d["sources"] = [{**s, "path": str(s["path"])} for s in d["sources"]]
        return stable_hash(d)


def _parse_ratio_map(raw: Any, where: str, allowed: tuple, key_kind=str) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise fail(where, "must be a non-empty mapping")
    out = {}
    for key in raw:
        k = key_kind(key) if key_kind is int and isinstance(key, (int, str)) and str(key).isdigit() else key
        one_of(k, allowed, f"{where}.{key}", "key")
        out[k] = number(raw, key, where, lo=0.0, hi=1.0e9)
    return out


def _parse_sum_to_one(raw: Any, where: str, allowed: tuple) -> dict[str, float]:
    out = _parse_ratio_map(raw, where, allowed)
    for key, value in out.items():
        in_range(value, 0.0, 1.0, f"{where}.{key}")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise fail(where, f"ratios must sum to 1, they sum to {total:.6g}")
    return out


def _parse_quality(raw: dict, where: str) -> QualityConfig:
    d = QualityConfig()
    q = QualityConfig(
        min_chars=get(raw, "min_chars", where, int, d.min_chars),
        max_chars=get(raw, "max_chars", where, int, d.max_chars),
        max_record_bytes=get(raw, "max_record_bytes", where, int, d.max_record_bytes),
        max_repetition=number(raw, "max_repetition", where, d.max_repetition, lo=0, hi=1),
        max_garbage=number(raw, "max_garbage", where, d.max_garbage, lo=0, hi=1),
        pii_entities=tuple(get(raw, "pii_entities", where, list, list(d.pii_entities))),
    )
    for i, ent in enumerate(q.pii_entities):
        one_of(ent, PII_ENTITIES, f"{where}.pii_entities[{i}]", "entity")
    if q.min_chars < 0 or q.max_chars <= q.min_chars:
        raise fail(f"{where}.max_chars", f"must be greater than min_chars ({q.min_chars})")
    if q.max_record_bytes <= 0:
        raise fail(f"{where}.max_record_bytes", "must be positive")
    return q


def _parse_dedup(raw: dict, where: str) -> DedupConfig:
    d = DedupConfig()
    cfg = DedupConfig(
        threshold=number(raw, "threshold", where, d.threshold, lo=0.05, hi=1.0),
        num_perm=number(raw, "num_perm", where, d.num_perm, lo=8, hi=1024, kind=int),
        shingle_size=number(raw, "shingle_size", where, d.shingle_size, lo=1, hi=16, kind=int),
        seed=get(raw, "seed", where, int, d.seed),
        bands=get(raw, "bands", where, int, None),
        boilerplate_doc_share=number(raw, "boilerplate_doc_share", where, d.boilerplate_doc_share, lo=0.0, hi=1.0),
    )
    if cfg.bands is not None and (cfg.bands <= 0 or cfg.num_perm % cfg.bands):
        raise fail(f"{where}.bands", f"must divide num_perm ({cfg.num_perm}), got {cfg.bands}")
    return cfg


MIX_KEYS = {"seed", "bucket_ratios", "tier_weights", "split_ratios", "total_examples", "replay", "ratio_tolerance"}


def _parse_mix(raw: dict, where: str) -> MixConfig:
    bucket_ratios = _parse_sum_to_one(raw.get("bucket_ratios"), f"{where}.bucket_ratios", BUCKETS)
    tier_weights = _parse_ratio_map(raw.get("tier_weights"), f"{where}.tier_weights", TIERS, key_kind=int)
    if all(w == 0 for w in tier_weights.values()):
        raise fail(f"{where}.tier_weights", "at least one tier needs a positive weight")
    split_ratios = _parse_sum_to_one(raw.get("split_ratios"), f"{where}.split_ratios", SPLITS)
    if split_ratios.get("train", 0) <= 0:
        raise fail(f"{where}.split_ratios.train", "must be positive")
    replay = section(raw, "replay", where, {"ratio", "cap", "per_bucket_cap"})
    total = get(raw, "total_examples", where, int, None)
    if total is not None and total <= 0:
        raise fail(f"{where}.total_examples", "must be positive (or omitted for 'as many as fit')")
    per_bucket_cap = get(replay, "per_bucket_cap", f"{where}.replay", int, None)
    if per_bucket_cap is not None and per_bucket_cap < 1:
        raise fail(f"{where}.replay.per_bucket_cap",
                   f"must be a positive number of examples, got {per_bucket_cap} (omit it for the overall cap "
                   "split evenly over the buckets with a positive ratio)")
    return MixConfig(
        seed=get(raw, "seed", where, int),
        bucket_ratios=bucket_ratios,
        tier_weights=tier_weights,
        split_ratios=split_ratios,
        total_examples=total,
        replay_ratio=number(replay, "ratio", f"{where}.replay", 0.0, lo=0, hi=0.5),
        replay_cap=number(replay, "cap", f"{where}.replay", 0, lo=0, kind=int),
        replay_per_bucket_cap=per_bucket_cap,
        ratio_tolerance=number(raw, "ratio_tolerance", where, 0.02, lo=0, hi=1),
    )


def load_data_recipe(recipes_dir: str | Path, storage_dir: str | Path) -> DataRecipe:
    """Read ``sources.yaml`` and ``data.yaml`` from ``recipes_dir`` and validate them."""
    recipes_dir = Path(recipes_dir)
    storage_dir = Path(storage_dir)
    sources_path = recipes_dir / "sources.yaml"
    data_path = recipes_dir / "data.yaml"
    src = read_yaml(sources_path)
    data = read_yaml(data_path)
    with in_file(sources_path):
        check_keys(src, {"sources"}, "")
        raw_sources = src.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise fail("sources", "must be a non-empty list")
        sources = tuple(
            _parse_source(raw, f"sources[{i}]", sources_path.parent, storage_dir)
            for i, raw in enumerate(raw_sources)
        )
        names = [s.name for s in sources]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise fail(f"sources[{names.index(dup, names.index(dup) + 1)}].name", f"duplicate source name {dup!r}")
    with in_file(data_path):
        check_keys(data, {"quality", "dedup", "mix", "keep_versions", "backend"}, "")
        recipe = DataRecipe(
            sources=sources,
            quality=_parse_quality(section(data, "quality", "", QualityConfig), "quality"),
            dedup=_parse_dedup(section(data, "dedup", "", DedupConfig), "dedup"),
            mix=_parse_mix(section(data, "mix", "", MIX_KEYS, required=True), "mix"),
            keep_versions=get(data, "keep_versions", "", int, 5),
            backend=one_of(get(data, "backend", "", str, "local"), DATA_BACKENDS, "backend", "backend"),
        )
        fed = {s.bucket for s in sources if s.bucket} | {b for s in sources for b in s.bucket_map.values()}
        dynamic = any(s.bucket_field and not s.bucket_map for s in sources)
        for bucket, ratio in recipe.mix.bucket_ratios.items():
            if ratio > 0 and bucket not in fed and not dynamic:
                raise fail(f"mix.bucket_ratios.{bucket}", "has a positive ratio but no source feeds this bucket")
    return recipe
