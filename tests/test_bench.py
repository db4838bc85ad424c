"""Every benchmark in bench/ runs in its smoke mode (tiny sizes, one repeat, the same code paths), so a
benchmark that breaks fails here; stdout holds only its JSON report, with the figures a user reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_smoke(script: str, tmp_path, timeout: int) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    # Smoke figures measure nothing: one intra-op thread keeps the run short on a busy shared machine,
    # where two OpenMP threads wait on each other (the gate smoke took 113 s instead of 12 s under load).
    env = {**os.environ, "SLEEP_PIPELINE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, f"bench/{script}", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"stdout of bench/{script} is not one JSON report:\n{proc.stdout[-2000:]}")
    assert report["smoke"] is True and report["machine"]["cpus"] > 0
    return report


def test_dedup_bench_smoke(tmp_path):
    report = run_smoke("dedup.py", tmp_path, timeout=300)
    assert report["corpus"]["docs"] == 2000
    for side in ("ours", "naive_datasketch", "rensa"):
        assert report[side]["docs_per_s"] > 0 and len(report[side]["seconds"]) == 1
    assert report["ours"]["recall"] is not None and report["ours"]["precision"] is not None
    for side in ("naive_datasketch", "rensa"):
        assert report[side]["candidate_pair_recall"] is not None
    # both corpora, each against the previous defaults in the same run
    real = report["real_text"]
    assert real["documents"] > 0 and real["true_pairs"] > 0 and real["from"]["site_packages_licences"] > 0
    for side in ("ours", "previous_defaults"):
        assert real[side]["recall"] is not None and real[side]["precision"] is not None
        assert report["templated"][side]["distinct_merged"] >= 0
    assert report["generated_previous_defaults"]["recall"] is not None
    assert report["speedup_vs_naive"] > 0 and report["ours_vs_rensa"] > 0
    assert isinstance(report["pass"], bool) and set(report["checks"]) >= {"real_text_recall", "real_text_precision"}


def test_dedup_ray_backend_bench_smoke(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run([sys.executable, "bench/dedup.py", "--backend", "ray", "--smoke"], cwd=ROOT,
                          env={**os.environ, "SLEEP_PIPELINE_HOME": str(home)}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["smoke"] is True and report["sizes"] == [1500, 3000]
    for entry in report["runs"].values():
        assert entry["identical"] is True
        for backend in ("local", "ray"):
            assert entry[backend]["docs_per_s"] > 0 and entry[backend]["driver_peak_rss_mb"] > 0
            assert entry[backend]["balanced_per_source"] and entry[backend]["records_in"] in (1500, 3000)
        assert entry["ray"]["partitions"] >= 2 and entry["ray"]["workers_seen"] >= 1
    assert set(report["driver_growth"]) == {"local", "ray"} and isinstance(report["pass"], bool)


def test_gate_bench_smoke(tmp_path):
    report = run_smoke("gate.py", tmp_path, timeout=300)
    assert report["examples"] > 0 and report["repeats"] == 1
    assert report["one_at_a_time_examples_per_s"] > 0 and report["batched_examples_per_s"] > 0
    assert report["speedup"] > 0 and isinstance(report["meets_target"], bool)
    same, total = map(int, report["identical_responses"].split("/"))
    assert total > 0 and 0 <= same <= total and report["max_metric_difference"] >= 0
    assert report["per_task"] and all(t["speedup"] > 0 for t in report["per_task"].values())


def test_train_throughput_bench_smoke(tmp_path):
    report = run_smoke("train_throughput.py", tmp_path, timeout=900)
    a, b = report["dagster_deepspeed"], report["bare_torch"]
    assert a["tokens_per_s"] > 0 and b["tokens_per_s"] > 0
    assert report["ratio"] == pytest.approx(a["tokens_per_s"] / b["tokens_per_s"], rel=1e-2)
    assert a["launch_overhead_s"] > 0 and isinstance(report["pass"], bool)
    [run_a], [run_b] = a["runs"], b["runs"]
    # both sides timed the same warm steps (after the first logged step)
    assert run_a["steps"] == run_b["steps"] == report["steps"] - 2


def test_compress_bench_smoke(tmp_path):
    report = run_smoke("compress.py", tmp_path, timeout=900)
    assert report["parent"]["cost"]["size_mb"] > 0
    assert {"pruned", "distilled", "int8", "distilled+int8"} <= set(report["candidates"])
    for c in report["candidates"].values():
        assert c["size_ratio"] > 0 and c["latency_ratio_b1"] > 0
    assert report["candidates"]["pruned"]["size_ratio"] > 1.2  # pruning really shrinks the files
