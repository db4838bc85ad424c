"""Data hygiene (ingest + clean + exact and near dedup into DuckDB) on the local backend and on Ray,
side by side at growing corpus sizes: throughput, the driver's peak memory, and whether both gave the
same answer. Run through ``python bench/dedup.py --backend ray [--sizes 100000,1000000]``.

The corpus is ``bench/dedup.py``'s generated one (a quarter planted exact / near copies), written as
three JSONL sources of tiers 1, 2 and 3. Each (size, backend) runs in a fresh process, so its peak
memory is its own: ``driver_peak_rss_mb`` is that process's peak resident memory (the Dagster step's,
for the Ray side the driver that holds only references; DuckDB runs in it), measured before the
digests below; ``driver_peak_rss_parts_mb_sampled`` its anonymous, file-backed and shared resident
memory sampled twice a second; ``cluster_peak_rss_mb`` samples the Ray
processes it started (workers, raylet, object store pages they touch). Sides are interleaved per size.

``identical`` compares digests of every kept row (record id, cluster), every duplicate (record id,
duplicate_of, kind, similarity) and every quarantine row, computed by DuckDB. ``pass``: identical at
every size, accounting balanced per source on both backends, and the Ray driver's peak at the largest
size within ``FLAT_LIMIT`` of its peak at the smallest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAT_LIMIT = 1.25  # Ray driver peak memory, largest size / smallest size
SHARES = (("tier1", 1, 0.5), ("tier2", 2, 0.3), ("tier3", 3, 0.2))
DIGESTS = {  # order-independent and streaming (no string of the whole table is built)
    "kept": "SELECT count(*) || ':' || bit_xor(hash(record_id, cluster_id, pii_scrubbed)) || ':' || "
            "sum(hash(record_id, cluster_id, pii_scrubbed)::HUGEINT) FROM deduped_corpus",
    "duplicates": "SELECT count(*) || ':' || bit_xor(hash(record_id, duplicate_of, kind, similarity)) || ':' || "
                  "sum(hash(record_id, duplicate_of, kind, similarity)::HUGEINT) FROM duplicates",
    "quarantine": "SELECT count(*) || ':' || bit_xor(hash(source, line_no, reason, detail)) || ':' || "
                  "sum(hash(source, line_no, reason, detail)::HUGEINT) FROM quarantine",
}


def write_sources(n_docs: int, folder: Path) -> None:
    from bench.dedup import make_corpus

    texts, _ = make_corpus(n_docs, seed=11)
    start = 0
    for i, (name, _tier, share) in enumerate(SHARES):
        end = n_docs if i == len(SHARES) - 1 else start + int(n_docs * share)
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for k in range(start, end):
                fh.write(json.dumps({"id": f"d{k}", "prompt": "", "response": texts[k], "bucket": "benign"}) + "\n")
        start = end


class _ClusterSampler(threading.Thread):
    """Peak total resident memory of this process's descendants (the local Ray cluster)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb, self.stop, self.max_workers = 0.0, threading.Event(), 0
        self.rss_parts: dict[str, float] = {}  # the driver's peak anonymous / file-backed / shared resident MB

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            total, workers = 0, 0
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                    workers += " ".join(child.cmdline()[:1]).startswith("ray::")
                except psutil.Error:
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    self.rss_parts[key] = max(self.rss_parts.get(key, 0.0), int(value.split()[0]) / 1024)
            self.max_workers = max(self.max_workers, workers)
            time.sleep(0.5)


def _vm_hwm_mb() -> float:
    """This process's peak resident memory. Not ``ru_maxrss``: across ``exec`` Linux keeps the peak of
    the process it replaced, so a child started by a parent holding the corpus would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(backend: str, folder: str, out: str, workers: int, address: str | None, driver_memory_mb: int) -> None:
    from sleep_pipeline.config import SourceConfig, load_data_recipe
    from sleep_pipeline.data.corpus import RayOptions, build_deduped_corpus, ingest_source
    from sleep_pipeline.data.ray_dedup import ray_session
    from sleep_pipeline.store import connect

    folder_p = Path(folder)
    recipe = load_data_recipe(ROOT / "recipes", folder_p)
    sources = tuple(SourceConfig(name=name, path=folder_p / f"{name}.jsonl", format="jsonl", tier=tier, bucket="benign")
                    for name, tier, _ in SHARES)
    recipe = dataclasses.replace(recipe, sources=sources, backend=backend)
    db = folder_p / f"{backend}.duckdb"
    db.unlink(missing_ok=True)
    options = RayOptions(address=address, num_cpus=workers, driver_memory_mb=driver_memory_mb)
    sampler = _ClusterSampler()
    sampler.start()
    started = time.perf_counter()

    def log(msg: str) -> None:  # progress on stderr, with this process's peak resident memory so far
        hwm = next(line.split(":")[1].strip() for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM"))
        print(f"[{backend} {time.perf_counter() - started:6.1f}s peak {hwm}] {msg}", file=sys.stderr, flush=True)

    with ray_session(address, workers, log) if backend == "ray" else contextlib.nullcontext():
        connected = time.perf_counter()
        for src in sources:
            ingest_source(src, recipe, db, "bench", ray=options, log=log)
        ingested = time.perf_counter()
        summary = build_deduped_corpus(recipe, db, "bench", ray=options, log=log)
        log("done")
        done = time.perf_counter()
    sampler.stop.set()
    peak_rss_mb = _vm_hwm_mb()  # before the digests below
    with connect(db, read_only=True) as con:
        digests = {k: con.execute(sql).fetchone()[0] for k, sql in DIGESTS.items()}
    Path(out).write_text(json.dumps({
        "seconds": {"connect": round(connected - started, 2), "ingest": round(ingested - connected, 2),
                    "clean_dedup": round(done - ingested, 2), "total": round(done - started, 2)},
        "driver_peak_rss_mb": round(peak_rss_mb, 1),
        "driver_peak_rss_parts_mb_sampled": {k: round(v, 1) for k, v in sampler.rss_parts.items()},
        "cluster_peak_rss_mb": round(sampler.peak_mb, 1) if backend == "ray" else None,
        "workers_seen": sampler.max_workers if backend == "ray" else None,
        "records_in": summary.records_in, "kept": summary.kept, "duplicates": summary.duplicates,
        "quarantined": summary.quarantined, "balanced_per_source": summary.balanced,
        "partitions": summary.dedup_stats.get("partitions"), "digests": digests,
        "stage_seconds": summary.dedup_stats.get("stage_seconds"), "shuffled_rows": summary.dedup_stats.get("shuffled_rows"),
    }))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run(sizes: list[int], workers: int, address: str | None, repeats: int, smoke: bool, emit,
        driver_memory_mb: int = 256, backends: tuple[str, ...] = ("local", "ray")) -> None:
    report: dict = {"benchmark": "dedup --backend ray", "smoke": smoke, "sizes": sizes, "workers": workers,
                    "driver_duckdb_memory_limit_mb": driver_memory_mb,
                    "address": address or "a local cluster started by the driver", "runs": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = Path(tmp) / str(n)
            folder.mkdir()
            t0 = time.perf_counter()
            write_sources(n, folder)
            print(f"corpus of {n:,} documents written in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
            runs: dict[str, list[dict]] = {b: [] for b in backends}
            for _ in range(repeats):
                for backend in backends:  # interleaved: this machine's CPU capacity drifts
                    out = folder / f"{backend}.json"
                    subprocess.run([sys.executable, str(ROOT / "bench" / "dedup.py"), "--backend", "ray",
                                    "--scale-child", backend, str(folder), str(out), str(workers), address or "",
                                    str(driver_memory_mb)],
                                   check=True, env=env, cwd=ROOT)
                    runs[backend].append(json.loads(out.read_text()))
                    r = runs[backend][-1]
                    print(f"{n:,} docs {backend}: {r['seconds']['total']}s, driver peak {r['driver_peak_rss_mb']} MB",
                          file=sys.stderr, flush=True)
            entry = {}
            for backend, rs in runs.items():
                best = min(rs, key=lambda r: r["seconds"]["total"])
                entry[backend] = {
                    **{k: v for k, v in best.items() if k != "digests"},
                    "seconds_all": [r["seconds"]["total"] for r in rs],
                    "docs_per_s": round(n / best["seconds"]["total"], 1),
                    "docs_per_s_clean_dedup": round(n / max(best["seconds"]["clean_dedup"], 1e-9), 1),
                    "driver_peak_rss_mb": max(r["driver_peak_rss_mb"] for r in rs),
                }
            every = [r for rs in runs.values() for r in rs]
            entry["identical"] = all(r["digests"] == every[0]["digests"] for r in every) if len(runs) > 1 else None
            if len(runs) > 1:
                entry["ray_overhead_s"] = round(entry["ray"]["seconds"]["total"] - entry["local"]["seconds"]["total"], 2)
            report["runs"][str(n)] = entry
    first, last = report["runs"][str(sizes[0])], report["runs"][str(sizes[-1])]
    report["driver_growth"] = {
        backend: round(last[backend]["driver_peak_rss_mb"] / first[backend]["driver_peak_rss_mb"], 3)
        for backend in backends}
    report["corpus_growth"] = round(sizes[-1] / sizes[0], 2)
    checks = {
        "identical_at_every_size": all(e["identical"] is not False for e in report["runs"].values()) and len(backends) > 1,
        "balanced_per_source": all(e[b]["balanced_per_source"] for e in report["runs"].values() for b in backends),
        "ray_driver_flat": "ray" in backends and report["driver_growth"]["ray"] <= FLAT_LIMIT,
    }
    report["target"] = {"ray_driver_growth_at_most": FLAT_LIMIT}
    report["checks"] = checks
    report["pass"] = all(checks.values())
    emit(report)
