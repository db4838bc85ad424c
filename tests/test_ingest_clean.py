"""Every kind of bad input gets a quarantine reason; PII is scrubbed; nothing is lost silently."""

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sleep_pipeline.cli import main as cli_main
from sleep_pipeline.config import DataRecipe, DedupConfig, MixConfig, QualityConfig, SourceConfig
from sleep_pipeline.data.clean import quality_issue, scrub_pii
from sleep_pipeline.data.corpus import build_deduped_corpus, ingest_source
from sleep_pipeline.data.generate import broken_records
from sleep_pipeline.data.ingest import SourceError, read_source

Q = QualityConfig(max_record_bytes=10_000)


def _jsonl_source(path, **kw) -> SourceConfig:
    return SourceConfig(name="s", path=path, format="jsonl", tier=kw.pop("tier", 2), bucket_field="bucket", **kw)


def test_each_broken_jsonl_line_gets_its_reason(tmp_path):
    good = [json.dumps({"id": f"g{i}", "prompt": f"Question {i}?", "response": f"Answer {i}.", "bucket": "reasoning"}).encode()
            for i in range(3)]
    dup_id = json.dumps({"id": "g0", "prompt": "Other?", "response": "Yes.", "bucket": "reasoning"}).encode()
    lines = good + broken_records(Q.max_record_bytes) + [dup_id]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = read_source(_jsonl_source(path), Q)
    reasons = result.reason_counts()
    assert reasons == {
        "invalid_json": 1, "invalid_utf8": 1, "empty": 2, "oversized": 1, "not_an_object": 1,
        "missing_field": 1, "bad_field_type": 1, "unknown_bucket": 1, "duplicate_id": 1, "invalid_unicode": 1,
    }
    # too_short / repetitive / garbage records parse fine: the quality filters catch them (below)
    assert len(result.records) == 3 + 3
    assert result.lines_in == len(lines) == len(result.records) + len(result.quarantine)
    by_reason = {q.reason: q for q in result.quarantine}
    assert by_reason["invalid_json"].line_no == 4
    assert by_reason["oversized"].detail.startswith(f"{len(lines[7]):,} bytes")
    assert "\ufffd" in by_reason["invalid_utf8"].excerpt  # shown, not crashed on
    assert by_reason["invalid_unicode"].detail.startswith("field 'prompt' holds a lone surrogate U+D800")


# Valid JSON whose strings cannot be encoded as UTF-8: "\ud800" is half of a UTF-16 surrogate pair.
SURROGATE_LINES = [
    '{"id": "ok1", "text": "Rivers carry sediment from the mountains down to the sea."}',
    '{"id": "bad1", "text": "Half a pair \\ud800 in the text"}',
    '{"id": "bad2", "text": "Clean text", "meta": {"notes": ["fine", "lone low half \\udc00"]}}',
    '{"id": "ok2", "text": "A whole pair is fine: \\ud83d\\ude00 (an emoji)."}',
]


def test_a_lone_surrogate_is_quarantined_by_the_source_reader_and_the_corpus_stores_the_rest(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(SURROGATE_LINES) + "\n")
    src = SourceConfig(name="s", path=path, format="jsonl", tier=2, bucket="benign")
    result = read_source(src, Q)
    assert [r["record_id"] for r in result.records] == ["s:ok1", "s:ok2"]
    assert result.records[1]["response"].endswith("\U0001f600 (an emoji).")
    details = {q.line_no: q.detail for q in result.quarantine if q.reason == "invalid_unicode"}
    assert set(details) == {2, 3}
    assert details[2].startswith("field 'text' holds a lone surrogate U+D800 at character 12")
    assert details[3].startswith("field 'meta.notes[1]' holds a lone surrogate U+DC00")

    # What the source assets run: ingest into DuckDB, then clean + dedup + write the corpus.
    recipe = DataRecipe(sources=(src,), quality=Q, dedup=DedupConfig(), mix=MixConfig(
        seed=1, bucket_ratios={"benign": 1.0}, tier_weights={2: 1.0}, split_ratios={"train": 1.0}))
    db = tmp_path / "sleep.duckdb"
    summary = ingest_source(src, recipe, db, "test")
    assert summary.reasons == {"invalid_unicode": 2} and summary.records_ok == 2
    corpus = build_deduped_corpus(recipe, db, "test")
    assert corpus.balanced and corpus.kept == 2 and corpus.per_reason == {"invalid_unicode": 2}
    rows = duckdb.connect(str(db), read_only=True).execute(
        "SELECT line_no, excerpt FROM quarantine WHERE reason = 'invalid_unicode' ORDER BY line_no").fetchall()
    assert [r[0] for r in rows] == [2, 3] and "\\ud800" in rows[0][1]


def test_a_lone_surrogate_is_quarantined_by_the_dedup_command(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(SURROGATE_LINES) + "\n")
    out = tmp_path / "out"
    assert cli_main(["dedup", str(path), "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["balanced"] and summary["kept"] == 2 and summary["quarantine_reasons"] == {"invalid_unicode": 2}
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in quarantine] == [(2, "invalid_unicode"), (3, "invalid_unicode")]
    assert "'text'" in quarantine[0]["detail"]
    assert [json.loads(line)["id"] for line in (out / "kept.jsonl").read_text(encoding="utf-8").splitlines()] == ["ok1", "ok2"]


def test_quality_filters_give_reasons():
    records = {json.loads(line)["prompt"]: json.loads(line) for line in broken_records(Q.max_record_bytes)[9:12]}
    assert quality_issue("?", Q)[0] == "too_short"
    assert quality_issue("x" * (Q.max_chars + 1), Q)[0] == "too_long"
    assert quality_issue(records["Buy now!"]["response"], Q)[0] == "repetitive"
    assert quality_issue(records["Decode"]["response"], Q)[0] == "garbage"
    # Ordinary structured content is not garbage or repetition.
    assert quality_issue('{"name": "Maria", "age": 34, "city": "Lisbon", "tags": ["a", "b"]}', Q) is None
    assert quality_issue("Move disk 1 from Peg 1 to Peg 3\nMove disk 2 from Peg 1 to Peg 2\nMove disk 1 from Peg 3 to Peg 2", Q) is None


def test_pii_is_scrubbed_and_counted():
    text = ("Mail jane.roe@example.org or call +1 415-555-0132 from 203.0.113.45; card 4111 1111 1111 1111; "
            "key sk-proj4f8a9b2c7d1e6f3a0b5c8d2e.")
    scrubbed, found = scrub_pii(text, Q.pii_entities)
    for secret in ("jane.roe@example.org", "415-555-0132", "203.0.113.45", "4111 1111 1111 1111", "sk-proj4f8a"):
        assert secret not in scrubbed
    assert sorted(found) == ["API_KEY", "CREDIT_CARD", "EMAIL_ADDRESS", "IP_ADDRESS", "PHONE_NUMBER"]
    # Task content with digits is left alone (no false phone numbers in grids or sums).
    grid = "Navigate:\n333333\n33<<<3\n3<33<3\nCalculate 12 - 7 - 1234567."
    assert scrub_pii(grid, Q.pii_entities) == (grid, [])


def test_parquet_and_txt_dir_sources(tmp_path):
    pq.write_table(pa.Table.from_pylist([
        {"question": "What is 2+2?", "answer": "4", "kind": "math"},
        {"question": "Spell cat backward", "answer": None, "kind": "words"},
    ]), tmp_path / "d.parquet")
    src = SourceConfig(name="pq", path=tmp_path / "d.parquet", format="parquet", tier=1, bucket_field="kind",
                       bucket_map={"math": "reasoning", "words": "basic_recognition"},
                       fields={"prompt": "question", "response": "answer"})
    result = read_source(src, Q)
    assert [r["bucket"] for r in result.records] == ["reasoning"]
    assert result.reason_counts() == {"missing_field": 1}

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("Water boils at 100 degrees Celsius at sea level.")
    (folder / "b.txt").write_bytes(b"caf\xe9")
    (folder / "c.txt").write_text("")
    (folder / "d.csv").write_text("x,y")
    src = SourceConfig(name="notes", path=folder, format="txt_dir", tier=2, bucket="benign")
    result = read_source(src, Q)
    assert [r["record_id"] for r in result.records] == ["notes:a"]
    assert result.records[0]["response"].startswith("Water boils")
    assert result.reason_counts() == {"invalid_utf8": 1, "empty": 1, "unsupported_file": 1}


def test_empty_or_missing_source_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(SourceError, match="is empty"):
        read_source(_jsonl_source(path), Q)
    with pytest.raises(SourceError, match="does not exist"):
        read_source(_jsonl_source(tmp_path / "missing.jsonl"), Q)
