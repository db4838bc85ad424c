"""Recipes (YAML) parsed into validated dataclasses.

Configuration is data: every recipe file is read here, checked field by field, and turned into frozen
dataclasses. A bad value raises :class:`RecipeError` naming the file and the field path
(``sources[2].format``), so a mistake stops the code location from loading instead of surfacing deep
inside a later step.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

# The five task buckets of the data-hygiene design plus the long-context and safety buckets the gate
# suites rely on. Every record of every source lands in exactly one of them.
TASK_BUCKETS = ("basic_recognition", "reasoning", "planning", "tool_use", "structured_output")
BUCKETS = TASK_BUCKETS + ("long_context", "safety", "benign")
SOURCE_FORMATS = ("jsonl", "parquet", "txt_dir")
TIERS = (1, 2, 3)
RECORD_FIELDS = ("id", "system", "prompt", "response", "text", "meta")


class RecipeError(ValueError):
    """A recipe value is missing or invalid; the message names the file and field."""


def _fail(where: str, msg: str) -> RecipeError:
    return RecipeError(f"{where}: {msg}")


def _get(d: Mapping[str, Any], key: str, where: str, kind: type | tuple, default: Any = ...) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise _fail(f"{where}.{key}", "is required")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind in (int, float):
        raise _fail(f"{where}.{key}", f"must be a number, got {value!r}")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _fail(f"{where}.{key}", f"must be {names}, got {type(value).__name__} {value!r}")
    return value


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _in_range(value: float, lo: float, hi: float, where: str) -> float:
    if not (lo <= value <= hi) or math.isnan(value):
        raise _fail(where, f"must be between {lo} and {hi}, got {value}")
    return value


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-able object, stable across runs and machines (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


GENERATORS = ("curated_tasks", "tool_calls", "structured_output", "long_context", "safety", "reposts")


def _parse_source(raw: Any, where: str, base_dir: Path, storage_dir: Path) -> SourceConfig:
    if not isinstance(raw, dict):
        raise _fail(where, "must be a mapping")
    _check_keys(
        raw,
        {"name", "path", "format", "tier", "bucket", "bucket_field", "bucket_map", "fields",
         "generator", "description"},
        where,
    )
    name = _get(raw, "name", where, str)
    if not name.isidentifier():
        raise _fail(f"{where}.name", f"must be a plain identifier (letters, digits, _), got {name!r}")
    fmt = _get(raw, "format", where, str)
    if fmt not in SOURCE_FORMATS:
        raise _fail(f"{where}.format", f"unknown format {fmt!r} (known: {', '.join(SOURCE_FORMATS)})")
    tier = _get(raw, "tier", where, int)
    if tier not in TIERS:
        raise _fail(f"{where}.tier", f"must be 1 (curated first-party), 2 or 3 (scraped/reposted), got {tier}")
    generator = _get(raw, "generator", where, str, None)
    if generator is not None and generator not in GENERATORS:
        raise _fail(f"{where}.generator", f"unknown generator {generator!r} (known: {', '.join(GENERATORS)})")
    path_text = _get(raw, "path", where, str).replace("{storage}", str(storage_dir))
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if generator is None and not path.exists():
        raise _fail(f"{where}.path", f"{path} does not exist")
    if generator is None and fmt == "txt_dir" and not path.is_dir():
        raise _fail(f"{where}.path", f"{path} must be a folder of .txt files for format txt_dir")

    bucket = _get(raw, "bucket", where, str, None)
    bucket_field = _get(raw, "bucket_field", where, str, None)
    if (bucket is None) == (bucket_field is None):
        raise _fail(f"{where}.bucket", "give exactly one of `bucket` (all records) or `bucket_field`")
    if bucket is not None and bucket not in BUCKETS:
        raise _fail(f"{where}.bucket", f"unknown bucket {bucket!r} (known: {', '.join(BUCKETS)})")
    bucket_map = _get(raw, "bucket_map", where, dict, {})
    for key, value in bucket_map.items():
        if value not in BUCKETS:
            raise _fail(f"{where}.bucket_map.{key}", f"unknown bucket {value!r} (known: {', '.join(BUCKETS)})")
    fields = _get(raw, "fields", where, dict, {})
    for key, value in fields.items():
        if key not in RECORD_FIELDS:
            raise _fail(f"{where}.fields.{key}", f"unknown record field (known: {', '.join(RECORD_FIELDS)})")
        if not isinstance(value, str):
            raise _fail(f"{where}.fields.{key}", "must name a field of the source file")
    return SourceConfig(
        name=name, path=path, format=fmt, tier=tier, bucket=bucket, bucket_field=bucket_field,
        bucket_map={str(k): str(v) for k, v in bucket_map.items()}, fields=dict(fields),
        generator=generator, description=_get(raw, "description", where, str, ""),
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


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.7  # Jaccard similarity of word shingles at which two texts are near-duplicates
    num_perm: int = 128
    shingle_size: int = 3
    seed: int = 1
    bands: int | None = None  # LSH bands; None picks them from threshold and num_perm
    # Shingles found in more than this share of documents are template text and not compared.
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

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def config_hash(self) -> str:
        d = asdict(self)
        d["sources"] = [{**s, "path": str(s["path"])} for s in d["sources"]]
        return stable_hash(d)


def _parse_ratio_map(raw: Any, where: str, allowed: tuple, key_kind=str) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise _fail(where, "must be a non-empty mapping")
    out = {}
    for key, value in raw.items():
        k = key_kind(key) if key_kind is int and isinstance(key, (int, str)) and str(key).isdigit() else key
        if k not in allowed:
            raise _fail(f"{where}.{key}", f"unknown key {key!r} (known: {', '.join(map(str, allowed))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(f"{where}.{key}", f"must be a number, got {value!r}")
        out[k] = float(_in_range(float(value), 0.0, 1.0e9, f"{where}.{key}"))
    return out


def _parse_sum_to_one(raw: Any, where: str, allowed: tuple) -> dict[str, float]:
    out = _parse_ratio_map(raw, where, allowed)
    for key, value in out.items():
        _in_range(value, 0.0, 1.0, f"{where}.{key}")
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise _fail(where, f"ratios must sum to 1, they sum to {total:.6g}")
    return out


def _section(raw: Any, where: str, cls: type) -> tuple[dict, Any]:
    """An optional mapping section whose keys are ``cls``'s fields: (the mapping, cls's defaults)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise _fail(where, "must be a mapping")
    _check_keys(raw, set(cls.__dataclass_fields__), where)
    return raw, cls()


def _parse_quality(raw: Any, where: str) -> QualityConfig:
    raw, d = _section(raw, where, QualityConfig)
    q = QualityConfig(
        min_chars=_get(raw, "min_chars", where, int, d.min_chars),
        max_chars=_get(raw, "max_chars", where, int, d.max_chars),
        max_record_bytes=_get(raw, "max_record_bytes", where, int, d.max_record_bytes),
        max_repetition=_in_range(_get(raw, "max_repetition", where, float, d.max_repetition), 0, 1, f"{where}.max_repetition"),
        max_garbage=_in_range(_get(raw, "max_garbage", where, float, d.max_garbage), 0, 1, f"{where}.max_garbage"),
        pii_entities=tuple(_get(raw, "pii_entities", where, list, list(d.pii_entities))),
    )
    for i, ent in enumerate(q.pii_entities):
        if ent not in PII_ENTITIES:
            raise _fail(f"{where}.pii_entities[{i}]", f"unknown entity {ent!r} (known: {', '.join(PII_ENTITIES)})")
    if q.min_chars < 0 or q.max_chars <= q.min_chars:
        raise _fail(f"{where}.max_chars", f"must be greater than min_chars ({q.min_chars})")
    if q.max_record_bytes <= 0:
        raise _fail(f"{where}.max_record_bytes", "must be positive")
    return q


def _parse_dedup(raw: Any, where: str) -> DedupConfig:
    raw, d = _section(raw, where, DedupConfig)
    cfg = DedupConfig(
        threshold=_in_range(_get(raw, "threshold", where, float, d.threshold), 0.05, 1.0, f"{where}.threshold"),
        num_perm=_get(raw, "num_perm", where, int, d.num_perm),
        shingle_size=_get(raw, "shingle_size", where, int, d.shingle_size),
        seed=_get(raw, "seed", where, int, d.seed),
        bands=_get(raw, "bands", where, int, None),
        boilerplate_doc_share=_in_range(
            _get(raw, "boilerplate_doc_share", where, float, d.boilerplate_doc_share), 0.0, 1.0, f"{where}.boilerplate_doc_share"
        ),
    )
    if not 8 <= cfg.num_perm <= 1024:
        raise _fail(f"{where}.num_perm", f"must be between 8 and 1024, got {cfg.num_perm}")
    if not 1 <= cfg.shingle_size <= 16:
        raise _fail(f"{where}.shingle_size", f"must be between 1 and 16, got {cfg.shingle_size}")
    if cfg.bands is not None and (cfg.bands <= 0 or cfg.num_perm % cfg.bands):
        raise _fail(f"{where}.bands", f"must divide num_perm ({cfg.num_perm}), got {cfg.bands}")
    return cfg


def _parse_mix(raw: Any, where: str) -> MixConfig:
    if not isinstance(raw, dict):
        raise _fail(where, "must be a mapping")
    _check_keys(
        raw,
        {"seed", "bucket_ratios", "tier_weights", "split_ratios", "total_examples", "replay",
         "ratio_tolerance"},
        where,
    )
    bucket_ratios = _parse_sum_to_one(raw.get("bucket_ratios"), f"{where}.bucket_ratios", BUCKETS)
    tier_weights = _parse_ratio_map(raw.get("tier_weights"), f"{where}.tier_weights", TIERS, key_kind=int)
    if all(w == 0 for w in tier_weights.values()):
        raise _fail(f"{where}.tier_weights", "at least one tier needs a positive weight")
    split_ratios = _parse_sum_to_one(raw.get("split_ratios"), f"{where}.split_ratios", SPLITS)
    if split_ratios.get("train", 0) <= 0:
        raise _fail(f"{where}.split_ratios.train", "must be positive")
    replay = raw.get("replay") or {}
    if not isinstance(replay, dict):
        raise _fail(f"{where}.replay", "must be a mapping")
    _check_keys(replay, {"ratio", "cap", "per_bucket_cap"}, f"{where}.replay")
    total = _get(raw, "total_examples", where, int, None)
    if total is not None and total <= 0:
        raise _fail(f"{where}.total_examples", "must be positive (or omitted for 'as many as fit')")
    cap = _get(replay, "cap", f"{where}.replay", int, 0)
    if cap < 0:
        raise _fail(f"{where}.replay.cap", "must be >= 0")
    per_bucket_cap = _get(replay, "per_bucket_cap", f"{where}.replay", int, None)
    if per_bucket_cap is not None and per_bucket_cap < 1:
        raise _fail(f"{where}.replay.per_bucket_cap",
                    f"must be a positive number of examples, got {per_bucket_cap} (omit it for the overall cap "
                    "split evenly over the buckets with a positive ratio)")
    return MixConfig(
        seed=_get(raw, "seed", where, int),
        bucket_ratios=bucket_ratios,
        tier_weights=tier_weights,
        split_ratios=split_ratios,
        total_examples=total,
        replay_ratio=_in_range(_get(replay, "ratio", f"{where}.replay", float, 0.0), 0, 0.5, f"{where}.replay.ratio"),
        replay_cap=cap,
        replay_per_bucket_cap=per_bucket_cap,
        ratio_tolerance=_in_range(_get(raw, "ratio_tolerance", where, float, 0.02), 0, 1, f"{where}.ratio_tolerance"),
    )


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a YAML mapping at the top level")
    return data


def load_data_recipe(recipes_dir: str | Path, storage_dir: str | Path) -> DataRecipe:
    """Read ``sources.yaml`` and ``data.yaml`` from ``recipes_dir`` and validate them."""
    recipes_dir = Path(recipes_dir)
    storage_dir = Path(storage_dir)
    sources_path = recipes_dir / "sources.yaml"
    data_path = recipes_dir / "data.yaml"
    src = _read_yaml(sources_path)
    data = _read_yaml(data_path)
    try:
        _check_keys(src, {"sources"}, "")
        raw_sources = src.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise _fail("sources", "must be a non-empty list")
        sources = tuple(
            _parse_source(raw, f"sources[{i}]", sources_path.parent, storage_dir)
            for i, raw in enumerate(raw_sources)
        )
        names = [s.name for s in sources]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise _fail(f"sources[{names.index(dup, names.index(dup) + 1)}].name", f"duplicate source name {dup!r}")
    except RecipeError as exc:
        raise RecipeError(f"{sources_path}: {exc}") from None
    try:
        _check_keys(data, {"quality", "dedup", "mix", "keep_versions"}, "")
        recipe = DataRecipe(
            sources=sources,
            quality=_parse_quality(data.get("quality"), "quality"),
            dedup=_parse_dedup(data.get("dedup"), "dedup"),
            mix=_parse_mix(data.get("mix"), "mix"),
            keep_versions=_get(data, "keep_versions", "", int, 5),
        )
        fed = {s.bucket for s in sources if s.bucket} | {b for s in sources for b in s.bucket_map.values()}
        dynamic = any(s.bucket_field and not s.bucket_map for s in sources)
        for bucket, ratio in recipe.mix.bucket_ratios.items():
            if ratio > 0 and bucket not in fed and not dynamic:
                raise _fail(f"mix.bucket_ratios.{bucket}", "has a positive ratio but no source feeds this bucket")
    except RecipeError as exc:
        raise RecipeError(f"{data_path}: {exc}") from None
    return recipe
