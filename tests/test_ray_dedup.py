"""Data hygiene on Ray: the same records kept, quarantined and marked as duplicates as the local
backend, row for row, on a real local Ray cluster (2 workers)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import duckdb
import psutil
import pyarrow as pa
import pytest
import yaml

from bench import real_corpus
from sleep_pipeline.config import DedupConfig, QualityConfig, RecipeError, load_data_recipe
from sleep_pipeline.data.corpus import RayOptions, build_deduped_corpus, clean_and_dedup, ingest_source
from sleep_pipeline.data.ingest import read_source
from sleep_pipeline.data.ray_dedup import clean_and_dedup_on_ray, ray_session
from tests.conftest import RECIPES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session(num_cpus=2):
        yield


def _rows(named_texts: list[tuple[str, int, list[tuple[str, str]]]]) -> list[dict]:
    rows = []
    for name, tier, items in named_texts:
        for i, (prompt, response) in enumerate(items, start=1):
            rows.append({"record_id": f"{name}:L{i}", "source": name, "tier": tier, "line_no": i, "bucket": "benign",
                         "system": "", "prompt": prompt, "response": response, "meta": "{}"})
    return rows


def _both(rows: list[dict], config: DedupConfig, parts: int = 3, batch: int = 200):
    """(local result, ray result) as comparable row lists, and both dedup stats."""
    local = clean_and_dedup([dict(r) for r in rows], QualityConfig(), config)
    order = {s: i for i, s in enumerate(dict.fromkeys(r["source"] for r in rows))}
    table = pa.Table.from_pylist([{**r, "ord": (order[r["source"]] << 40) + r["line_no"]} for r in rows])
    got: dict[str, list] = {"kept": [], "duplicates": [], "quarantine": []}

    def sink(kind, payload):
        got[kind].extend(payload.to_pylist() if hasattr(payload, "to_pylist") else payload)

    outcome = clean_and_dedup_on_ray((table.slice(i, batch) for i in range(0, table.num_rows, batch)),
                                     QualityConfig(), config, parts, sink)
    kept_cols = ("record_id", "cluster_id", "system", "prompt", "response", "pii_scrubbed")
    dup_cols = ("record_id", "duplicate_of", "kind", "similarity", "cluster_id")
    as_rows = lambda rs, cols: sorted(tuple(r[c] for c in cols) for r in rs)  # noqa: E731
    return ((as_rows(local.kept, kept_cols), as_rows(local.duplicates, dup_cols),
             sorted((q.record_id, q.reason, q.detail) for q in local.rejected)),
            (as_rows(got["kept"], kept_cols), as_rows(got["duplicates"], dup_cols),
             sorted((q["record_id"], q["reason"], q["detail"]) for q in got["quarantine"])),
            local.result.stats, outcome.stats)


INGEST_TABLES = (
    "SELECT * FROM raw_records ORDER BY source, line_no",
    "SELECT stage, source, line_no, record_id, reason, detail, excerpt FROM quarantine WHERE stage = 'ingest' ORDER BY ALL",
    "SELECT ingest_id, source, path, format, tier, content_sha256, lines_in, records_ok, quarantined FROM source_ingests "
    "ORDER BY ALL",
)


def _table(db, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_embedded_default_is_identical_on_ray(ray_cluster, tmp_path, generated_sources):
    """The shipped sources: every corpus row, duplicate (with duplicate_of, kind, similarity) and
    quarantine row is the same on both backends, and so is the corpus version."""
    recipe = load_data_recipe(RECIPES, generated_sources)
    ray_recipe = dataclasses.replace(recipe, backend="ray")
    options = RayOptions(partition_rows=1500, batch_rows=1000, ingest_chunk_bytes=200_000)
    local_db, ray_db = tmp_path / "local.duckdb", tmp_path / "ray.duckdb"
    for src in recipe.sources:
        ingested = ingest_source(src, recipe, local_db, "ingest")
        assert ingest_source(src, ray_recipe, ray_db, "ingest", ray=options) == ingested
    for sql in INGEST_TABLES:
        assert _table(ray_db, sql) == _table(local_db, sql), sql
    local = build_deduped_corpus(recipe, local_db, "run")
    on_ray = build_deduped_corpus(ray_recipe, ray_db, "run", ray=options)
    assert on_ray.dedup_stats["partitions"] >= 3 and on_ray.dedup_stats["backend"] == "ray"
    assert local.balanced and on_ray.balanced
    assert on_ray.corpus_version == local.corpus_version
    assert on_ray.per_source == local.per_source and on_ray.per_reason == local.per_reason
    assert on_ray.near_duplicates == local.near_duplicates > 0 and on_ray.exact_duplicates == local.exact_duplicates > 0
    for sql in ("SELECT * FROM deduped_corpus ORDER BY record_id",
                "SELECT * FROM duplicates ORDER BY record_id",
                "SELECT stage, source, line_no, record_id, reason, detail, excerpt FROM quarantine ORDER BY ALL"):
        assert _table(ray_db, sql) == _table(local_db, sql), sql
    assert on_ray.sample == local.sample
    assert {k: v for k, v in on_ray.dedup_stats.items() if k not in ("backend", "partitions", "stage_seconds", "shuffled_rows")} == \
        {k: v for k, v in local.dedup_stats.items() if k != "backend"}


def test_real_text_with_an_oversized_bucket_is_identical(ray_cluster):
    """Licence texts installed on this machine, plus 150 near copies of one of them (an LSH bucket too
    large to pair up fully, so the LSH runs again on the kept documents): the same answer."""
    corpus = real_corpus.build(max_docs=300)
    base = sorted((t for t in corpus.texts if 2000 < len(t) < 20000), key=len)[0].split(" ")
    copies = [" ".join(base[:i] + base[i + 1:]) for i in range(1, 301, 2)]  # 150 distinct, each one word shorter
    rows = _rows([("licences", 1, [("", t) for t in corpus.texts]), ("reposts", 3, [("", t) for t in copies])])
    local, on_ray, local_stats, ray_stats = _both(rows, DedupConfig(), parts=4, batch=97)
    assert local_stats["lsh_rounds"] >= 2 and local_stats["near_duplicates"] > 100
    assert on_ray == local
    assert ray_stats["lsh_rounds"] == local_stats["lsh_rounds"]
    assert ray_stats["candidate_pairs"] == local_stats["candidate_pairs"]


def _kill_first(name: str, killed: list, stop: threading.Event) -> None:
    """SIGKILL the first Ray worker process seen running a task named ``name``."""
    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith(f"ray::{name}"):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.02)


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(ray_cluster, generated_sources):
    """A worker SIGKILLed while it cleans a batch: Ray runs the task again and the answer is the
    local one, every record accounted for once."""
    recipe = load_data_recipe(RECIPES, generated_sources)
    records = read_source(recipe.source("curated_tasks"), recipe.quality).records[:3000]
    rows = [{k: r[k] for k in ("record_id", "source", "tier", "line_no", "bucket", "system", "prompt", "response", "meta")}
            for r in records]
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first, args=("clean_batch", killed, stop), daemon=True)
    killer.start()
    try:
        local, on_ray, _, _ = _both(rows, recipe.dedup, parts=2, batch=1000)
    finally:
        stop.set()
    assert killed, "no worker was running clean_batch to kill"
    assert on_ray == local
    assert sum(len(x) for x in on_ray) == len(rows)


def test_an_unknown_backend_is_a_clear_error(tmp_path):
    for name in ("sources.yaml", "data.yaml"):
        shutil.copy(RECIPES / name, tmp_path / name)
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    data["backend"] = "spark"
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="backend"):
        load_data_recipe(tmp_path, tmp_path)


def test_the_corpus_asset_runs_on_ray_when_the_recipe_says_so(ray_cluster, recipes_dir, storage):
    """``backend: ray`` in data.yaml: the Dagster step cleans and deduplicates through the ray_cluster
    resource, and the blocking accounting check passes."""
    import dagster as dg

    import definitions

    data = yaml.safe_load((recipes_dir / "data.yaml").read_text())
    data["backend"] = "ray"
    (recipes_dir / "data.yaml").write_text(yaml.safe_dump(data))
    defs = definitions.build_defs(recipes_dir, storage)
    graph = defs.resolve_asset_graph()
    # a local cluster per step would compete for the same cores: one Ray data step at a time
    assert graph.get(dg.AssetKey("deduped_corpus")).pools == {"sleep_pipeline_ray"}
    assert graph.get(dg.AssetKey(["raw", "curated_tasks"])).pools == {"sleep_pipeline_ray"}
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources,
                            instance=dg.DagsterInstance.ephemeral(),
                            selection=dg.AssetSelection.groups("sources") | dg.AssetSelection.keys("deduped_corpus"))
    assert result.success
    meta = result.asset_materializations_for_node("deduped_corpus")[0].metadata
    assert meta["backend"].value == "ray" and meta["dedup"].value["backend"] == "ray"
    checks = {ev.asset_check_key.name: ev.passed for ev in result.get_asset_check_evaluations()}
    assert checks.get("records_accounted_for") is True


def test_every_format_and_every_bad_line_is_read_the_same_on_ray(ray_cluster, tmp_path):
    """A JSONL file with one line of every bad kind, repeated ids and no final newline; a Parquet file
    of several row groups; a txt folder with a file that is not .txt: the same records, line numbers,
    quarantine rows and reasons from Ray tasks (many small chunks) as from the local reader."""
    import pyarrow.parquet as pq

    from sleep_pipeline.config import SourceConfig
    from sleep_pipeline.data.generate import broken_records

    recipe = load_data_recipe(RECIPES, tmp_path)
    good = [json.dumps({"id": f"r{i % 40}", "prompt": f"Question {i}?", "response": f"Answer number {i}.",
                        "bucket": "benign"}).encode() for i in range(60)]
    lines = good[:30] + broken_records(recipe.quality.max_record_bytes) + good[30:]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))  # no newline after the last line
    pq.write_table(pa.table({"question": [f"Q{i}" for i in range(50)], "answer": [f"A{i} is the answer" if i != 13 else None for i in range(50)],
                             "kind": ["math", "words"] * 25}), tmp_path / "d.parquet", row_group_size=7)
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(12):
        (folder / f"n{i:02d}.txt").write_text(f"Note {i}: water boils at 100 degrees at sea level." if i != 5 else "")
    (folder / "readme.md").write_text("not read")
    sources = (
        SourceConfig(name="j", path=tmp_path / "in.jsonl", format="jsonl", tier=2, bucket_field="bucket"),
        SourceConfig(name="pq", path=tmp_path / "d.parquet", format="parquet", tier=1, bucket_field="kind",
                     bucket_map={"math": "reasoning", "words": "basic_recognition"},
                     fields={"prompt": "question", "response": "answer"}),
        SourceConfig(name="notes", path=folder, format="txt_dir", tier=2, bucket="benign"),
    )
    recipe = dataclasses.replace(recipe, sources=sources)
    options = RayOptions(ingest_chunk_bytes=300)
    for src in sources:
        local = ingest_source(src, recipe, tmp_path / "local.duckdb", "ingest")
        on_ray = ingest_source(src, dataclasses.replace(recipe, backend="ray"), tmp_path / "ray.duckdb", "ingest",
                               ray=options)
        assert on_ray == local and local.quarantined > 0, src.name
    for sql in INGEST_TABLES:
        assert _table(tmp_path / "ray.duckdb", sql) == _table(tmp_path / "local.duckdb", sql), sql
    reasons = dict(_table(tmp_path / "ray.duckdb", "SELECT reason, count(*) FROM quarantine GROUP BY reason"))
    assert reasons["duplicate_id"] == 20 and reasons["invalid_utf8"] == 1 and reasons["unsupported_file"] == 1


def test_an_empty_source_is_a_clear_error_on_ray_too(ray_cluster, tmp_path):
    from sleep_pipeline.config import SourceConfig
    from sleep_pipeline.data.ingest import SourceError

    (tmp_path / "empty.jsonl").write_bytes(b"")
    src = SourceConfig(name="e", path=tmp_path / "empty.jsonl", format="jsonl", tier=2, bucket="benign")
    recipe = dataclasses.replace(load_data_recipe(RECIPES, tmp_path), sources=(src,), backend="ray")
    with pytest.raises(SourceError, match="is empty"):
        ingest_source(src, recipe, tmp_path / "ray.duckdb", "ingest", ray=RayOptions())
    assert _table(tmp_path / "ray.duckdb", "SELECT count(*) FROM source_ingests") == [(0,)]
