"""Read one configured source into canonical records; every unreadable record is quarantined.

A source is a JSONL file, a Parquet file or a folder of ``.txt`` files (one record per file). Each
line / row / file becomes a record ``{record_id, source, tier, line_no, bucket, system, prompt,
response, meta}`` or a quarantine row with its line number and one of the reasons in
:data:`INGEST_REASONS`. Fields a source carries beyond the mapped ones are kept in ``meta`` (a JSON
string), so verifier data such as a task's expected answer travels with the record.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sleep_pipeline.config import BUCKETS, QualityConfig, SourceConfig

INGEST_REASONS = (
    "invalid_utf8", "invalid_json", "invalid_unicode", "not_an_object", "empty", "oversized", "missing_field",
    "bad_field_type", "unknown_bucket", "duplicate_id", "unsupported_file",
)
EXCERPT_CHARS = 200
# JSON may spell half of a UTF-16 surrogate pair on its own ("\\ud800"): valid JSON, but the string it
# decodes to cannot be encoded as UTF-8, so no later stage (Arrow, DuckDB, a UTF-8 file) could store it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class SourceError(RuntimeError):
    """The source as a whole cannot be read (missing, empty, unreadable file)."""


@dataclass
class QuarantineRow:
    stage: str
    source: str
    line_no: int
    record_id: str | None
    reason: str
    detail: str
    excerpt: str


@dataclass
class IngestResult:
    source: str
    records: list[dict] = field(default_factory=list)
    quarantine: list[QuarantineRow] = field(default_factory=list)
    lines_in: int = 0
    content_sha256: str = ""

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self.quarantine:
            counts[q.reason] = counts.get(q.reason, 0) + 1
        return counts


def excerpt(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    return raw[:EXCERPT_CHARS]


def _raw_units(src: SourceConfig) -> Iterator[tuple[int, str, Any]]:
    """(line_no, kind, payload): kind is "bytes" (a JSONL line or a .txt file), "row" (a Parquet row
    as a dict) or "skip" (a file in a txt folder that is not .txt; payload is its name)."""
    if src.format == "jsonl":
        with open(src.path, "rb") as fh:
            for line_no, line in enumerate(fh, start=1):
                yield line_no, "bytes", line.rstrip(b"\r\n")
    elif src.format == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(src.path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise SourceError(f"source {src.name!r}: cannot read Parquet file {src.path}: {exc}") from exc
        for line_no, row in enumerate(table.to_pylist(), start=1):
            yield line_no, "row", row
    elif src.format == "txt_dir":
        for line_no, path in enumerate(sorted(p for p in src.path.iterdir() if p.is_file()), start=1):
            if path.suffix.lower() != ".txt":
                yield line_no, "skip", path.name
            else:
                yield line_no, "bytes", (path.name, path.read_bytes())
    else:  # validated at load; kept for a clear message if a caller builds a config by hand
        raise SourceError(f"source {src.name!r}: unknown format {src.format!r}")


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where a decoded JSON value holds a lone surrogate, as a detail naming the field (``text``,
    ``meta.note``, ``tags[2]``, or a key), else None."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m is None:
            return None
        return (f"field {path or '(the value)'!r} holds a lone surrogate U+{ord(m.group()):04X} at character "
                f"{m.start()} (an escape that is half of a UTF-16 pair; such text cannot be encoded as UTF-8)")
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _SURROGATE.search(str(key)):
                return f"a key of {path or 'the object'!r} holds a lone surrogate: {ascii(key)}"
            found = lone_surrogate(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, f"{path}[{i}]")
            if found:
                return found
    return None


def content_sha256(src: SourceConfig) -> str:
    h = hashlib.sha256()
    paths = sorted(p for p in src.path.iterdir() if p.is_file()) if src.path.is_dir() else [src.path]
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_source(src: SourceConfig, quality: QualityConfig) -> IngestResult:
    if not src.path.exists():
        raise SourceError(f"source {src.name!r}: {src.path} does not exist")
    result = IngestResult(source=src.name, content_sha256=content_sha256(src))
    seen_ids: set[str] = set()
    for line_no, kind, payload in _raw_units(src):
        result.lines_in += 1
        record, rejected = parse_unit(src, quality, line_no, kind, payload)
        if rejected is not None:
            result.quarantine.append(rejected)
        elif record["record_id"] in seen_ids:
            result.quarantine.append(duplicate_id(src, record, record.pop("_excerpt")))
        else:
            seen_ids.add(record["record_id"])
            record.pop("_excerpt")
            result.records.append(record)
    if result.lines_in == 0:
        raise SourceError(f"source {src.name!r}: {src.path} is empty (no records to read)")
    return result


def duplicate_id(src: SourceConfig, record: dict, excerpt_text: str) -> QuarantineRow:
    """The quarantine row of a record whose id an earlier line of its source already used."""
    return QuarantineRow("ingest", src.name, record["line_no"], record["record_id"], "duplicate_id",
                         f"id {record['record_id']!r} already used earlier in this source", excerpt_text)


def parse_unit(src: SourceConfig, quality: QualityConfig, line_no: int, kind: str,
               payload: Any) -> tuple[dict | None, QuarantineRow | None]:
    """One line / row / file of a source: (its canonical record with ``_excerpt``, None) or (None, its
    quarantine row). Whether its id was used earlier in the source is the caller's check."""
    rejected: list[QuarantineRow] = []

    def reject(line_no: int, reason: str, detail: str, raw: bytes | str, record_id: str | None = None) -> None:
        rejected.append(QuarantineRow("ingest", src.name, line_no, record_id, reason, detail, excerpt(raw)))

    if kind == "skip":
        reject(line_no, "unsupported_file", f"{payload}: only .txt files are read from a txt_dir source", payload)
        return None, rejected[0]
    if kind == "row":
        size = len(json.dumps(payload, default=str))
        if size > quality.max_record_bytes:
            reject(line_no, "oversized", f"{size:,} bytes > max_record_bytes {quality.max_record_bytes:,}", str(payload))
            return None, rejected[0]
        obj, raw = payload, json.dumps(payload, default=str)
    else:
        name, data = payload if src.format == "txt_dir" else (None, payload)
        if len(data) > quality.max_record_bytes:
            reject(line_no, "oversized", f"{len(data):,} bytes > max_record_bytes {quality.max_record_bytes:,}", data)
            return None, rejected[0]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            reject(line_no, "invalid_utf8", f"byte {exc.start}: {exc.reason}", data)
            return None, rejected[0]
        if not text.strip():
            reject(line_no, "empty", "blank line" if name is None else f"{name} is empty", data)
            return None, rejected[0]
        if src.format == "txt_dir":
            obj, raw = {"id": Path(name).stem, "text": text}, text
        else:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                reject(line_no, "invalid_json", f"{exc.msg} at column {exc.colno}", text)
                return None, rejected[0]
            raw = text
            surrogate = lone_surrogate(obj) if _SURROGATE_ESCAPE.search(text) else None
            if surrogate:
                reject(line_no, "invalid_unicode", surrogate, text)
                return None, rejected[0]
    if not isinstance(obj, dict):
        reject(line_no, "not_an_object", f"a JSON {type(obj).__name__}, expected an object", raw)
        return None, rejected[0]
    record = _to_record(src, obj, line_no, raw, reject)
    if record is None:
        return None, rejected[0]
    record["_excerpt"] = excerpt(raw)
    return record, None


def _to_record(src: SourceConfig, obj: dict, line_no: int, raw: str, reject) -> dict | None:
    f = src.field_name
    mapped = {f(k) for k in ("id", "system", "prompt", "response", "text", "meta")}
    if src.bucket_field:
        mapped.add(src.bucket_field)
    values: dict[str, str] = {}
    for key in ("system", "prompt", "response", "text"):
        value = obj.get(f(key))
        if value is None:
            continue
        if not isinstance(value, str):
            reject(line_no, "bad_field_type", f"field {f(key)!r} must be a string, got {type(value).__name__}", raw)
            return None
        values[key] = value
    if "response" not in values:
        if "text" not in values:
            reject(line_no, "missing_field", f"needs {f('response')!r} (with {f('prompt')!r}) or {f('text')!r}", raw)
            return None
        values["response"] = values.pop("text")
    values.pop("text", None)
    if not values["response"].strip():
        reject(line_no, "empty", f"field {f('response')!r} is blank", raw)
        return None

    if src.bucket is not None:
        bucket = src.bucket
    else:
        value = obj.get(src.bucket_field)
        bucket = src.bucket_map.get(str(value), value) if value is not None else None
        if bucket not in BUCKETS:
            reject(line_no, "unknown_bucket", f"{src.bucket_field}={value!r} maps to no known bucket", raw)
            return None

    raw_id = obj.get(f("id"))
    record_id = f"{src.name}:{raw_id}" if raw_id not in (None, "") else f"{src.name}:L{line_no}"
    meta_field = obj.get(f("meta"))
    extra = {k: v for k, v in obj.items() if k not in mapped}
    if isinstance(meta_field, dict):
        extra = {**extra, **meta_field}
    elif meta_field is not None:
        extra["meta"] = meta_field
    return {
        "record_id": record_id,
        "source": src.name,
        "tier": src.tier,
        "line_no": line_no,
        "bucket": bucket,
        "system": values.get("system", ""),
        "prompt": values.get("prompt", ""),
        "response": values["response"],
        "meta": json.dumps(extra, ensure_ascii=False, default=str, sort_keys=True),
    }
