"""The Dagster layer: definitions load, every asset materialises, blocking checks stop the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

import definitions
from tests.conftest import ROOT

REQUIRED = {"deduped_corpus", "tiered_data_mix"}


def _defs(recipes_dir, storage):
    return definitions.build_defs(recipes_dir, storage)


def test_definitions_load_with_sources_upstream_of_the_corpus(recipes_dir, tmp_path):
    defs = _defs(recipes_dir, tmp_path)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert REQUIRED <= keys
    sources = yaml.safe_load((recipes_dir / "sources.yaml").read_text())["sources"]
    corpus_parents = {k.to_user_string() for k in graph.get(dg.AssetKey("deduped_corpus")).parent_keys}
    assert corpus_parents == {f"raw/{s['name']}" for s in sources}
    for s in sources:
        spec = graph.get(dg.AssetKey(["raw", s["name"]]))
        assert spec.metadata["tier"] == s["tier"]
    assert defs.resolve_job_def("sleep_cycle") is not None
    # the gate: report downstream of the candidate and the suites, release behind it in a pool of its own
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("gate_report")).parent_keys} == {"dreamed_checkpoint", "gate_suites"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("compressed_checkpoint")).parent_keys} == {"trained_checkpoint"}
    # Dream starts from the candidate Compress selected; the Gate runs after it
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("dream_set")).parent_keys} == {
        "compressed_checkpoint", "gate_suites", "red_team_library"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("red_team_library")).parent_keys} == {"compressed_checkpoint"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("dreamed_checkpoint")).parent_keys} == {"dream_set"}
    release = graph.get(dg.AssetKey("gated_release"))
    assert release.pools == {"sleep_pipeline_release"}
    assert {c.name for c in defs.resolve_asset_graph().asset_check_keys} >= {"capability_gate", "safety_gate"}
    assert {s.name for s in defs.schedules} == {"weekly_rhythm", "monthly_rhythm", "daily_rhythm"}
    assert {s.name for s in defs.sensors} == {"canary_promotion", "training_trigger"}
    assert {j.name for j in defs.jobs} >= {"sleep_cycle", "rollback_release", "promote_canary", "raise_alarm"}
    # the module-level object dagster loads is valid too
    assert definitions.defs.resolve_asset_graph().get_all_asset_keys()


def test_every_asset_materialises_in_process(recipes_dir, storage):
    """Data and Learn with the shipped recipes, Learn cut to 150 steps to save test time (the Gate on
    real candidates: tests/test_gate_flow.py)."""
    learn = yaml.safe_load((recipes_dir / "learn.yaml").read_text())
    learn["training"].update({"max_steps": 150, "eval_steps": 50, "save_steps": 50})
    (recipes_dir / "learn.yaml").write_text(yaml.safe_dump(learn))
    defs = _defs(recipes_dir, storage)
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources,
                            instance=dg.DagsterInstance.ephemeral(),
                            selection=dg.AssetSelection.all() - dg.AssetSelection.groups("gate"))
    assert result.success
    materialized = {ev.event_specific_data.materialization.asset_key.to_user_string()
                    for ev in result.get_asset_materialization_events()}
    assert REQUIRED <= materialized
    assert len([k for k in materialized if k.startswith("raw/")]) == 7
    checks = {ev.asset_check_key.name: ev.passed for ev in result.get_asset_check_evaluations()}
    assert checks == {"records_accounted_for": True, "mix_not_empty": True, "bucket_ratios_within_tolerance": True}

    corpus_meta = result.asset_materializations_for_node("deduped_corpus")[0].metadata
    n_in, kept = corpus_meta["records_in"].value, corpus_meta["kept"].value
    assert n_in == kept + corpus_meta["quarantined"].value + corpus_meta["duplicates"].value
    assert corpus_meta["quarantined"].value >= 13  # every planted broken record

    db = duckdb.connect(str(storage / "sleep.duckdb"), read_only=True)
    # Every broken record kind is in quarantine with its line number.
    reasons = {r for (r,) in db.execute("SELECT DISTINCT reason FROM quarantine").fetchall()}
    assert reasons >= {"invalid_json", "invalid_utf8", "empty", "oversized", "not_an_object", "missing_field",
                       "bad_field_type", "unknown_bucket", "too_short", "repetitive", "garbage", "invalid_unicode"}
    assert db.execute("SELECT count(*) FROM quarantine WHERE line_no IS NULL OR reason IS NULL").fetchone()[0] == 0
    # Planted reposts: removed in favour of their tier-1 original.
    planted = db.execute("""
        SELECT json_extract_string(r.meta, '$.perturbation') AS kind, d.duplicate_of,
               (SELECT tier FROM raw_records o WHERE o.record_id = d.duplicate_of) AS kept_tier,
               d.cluster_id,
               (SELECT cluster_id FROM deduped_corpus c WHERE split_part(c.record_id, ':', 2) = json_extract_string(r.meta, '$.copy_of')
                UNION ALL
                SELECT cluster_id FROM duplicates c WHERE split_part(c.record_id, ':', 2) = json_extract_string(r.meta, '$.copy_of')) AS original_cluster
        FROM raw_records r LEFT JOIN duplicates d USING (record_id)
        WHERE r.source = 'forum_reposts' AND json_extract_string(r.meta, '$.copy_of') IS NOT NULL""").fetchall()
    exactish = [p for p in planted if p[0] in ("exact", "recase", "noise")]
    assert exactish and all(p[1] is not None for p in exactish), "exact / re-cased / noisy copies must all be removed"
    # ... into their tier-1 original's cluster, whose kept copy is a tier-1 record
    assert all(p[3] == p[4] and p[2] == 1 for p in exactish)
    removed = [p for p in planted if p[1] is not None]
    assert len(removed) / len(planted) >= 0.9
    # PII was scrubbed from what is kept.
    assert db.execute("SELECT count(*) FROM deduped_corpus WHERE prompt LIKE '%jane.roe@example.org%'").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM deduped_corpus WHERE pii_scrubbed <> ''").fetchone()[0] >= 3


def test_blocking_ratio_check_stops_what_comes_after_the_mix(recipes_dir, storage):
    # Ask for more planning examples than exist, with no tolerance: the ratio check must fail ...
    data = yaml.safe_load((recipes_dir / "data.yaml").read_text())
    data["mix"]["total_examples"] = 50_000
    data["mix"]["ratio_tolerance"] = 0.0
    (recipes_dir / "data.yaml").write_text(yaml.safe_dump(data))
    defs = _defs(recipes_dir, storage)

    trained = []

    @dg.asset(deps=["tiered_data_mix"])
    def downstream_consumer() -> None:  # stands in for the training step that follows the mix
        trained.append(True)

    job_defs = dg.Definitions(assets=[*defs.assets, downstream_consumer], asset_checks=list(defs.asset_checks),
                              resources=defs.resources,
                              jobs=[dg.define_asset_job("all", selection=dg.AssetSelection.all())])
    result = job_defs.resolve_job_def("all").execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    checks = {ev.asset_check_key.name: ev.passed for ev in result.get_asset_check_evaluations()}
    assert checks["bucket_ratios_within_tolerance"] is False
    assert not trained, "a blocking check failure must skip downstream assets"
    assert not result.success


def test_parallel_cli_run_shares_the_duckdb_file(recipes_dir, storage, tmp_path):
    """The real `dagster asset materialize` (multiprocess executor): source steps write one DuckDB file at once."""
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dh"), "SLEEP_PIPELINE_HOME": str(storage),
           "SLEEP_PIPELINE_RECIPES": str(recipes_dir)}
    (tmp_path / "dh").mkdir()
    subprocess.run([str(Path(sys.executable).parent / "dagster"), "instance", "migrate"], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "definitions",
                           "--select", "*tiered_data_mix"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stderr
    db = duckdb.connect(str(storage / "sleep.duckdb"), read_only=True)
    assert db.execute("SELECT count(DISTINCT source) FROM raw_records").fetchone()[0] == 7
    assert db.execute("SELECT count(*) FROM data_versions").fetchone()[0] == 1
