"""Print what the last sleep cycle produced: data version, record accounting, where to look next.

    python -m sleep_pipeline.report      (uses SLEEP_PIPELINE_HOME, default ./.sleep_pipeline)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sleep_pipeline.store import connect


def main() -> int:
    root = Path(os.environ.get("SLEEP_PIPELINE_HOME") or Path.cwd() / ".sleep_pipeline")
    db = root / "sleep.duckdb"
    if not db.exists():
        print(f"no database at {db}: run a cycle first", file=sys.stderr)
        return 1
    with connect(db, read_only=True) as con:
        corpus = con.execute("SELECT corpus_version, stats FROM corpus_versions ORDER BY created_at DESC LIMIT 1").fetchone()
        version = con.execute("SELECT manifest FROM data_versions ORDER BY created_at DESC LIMIT 1").fetchone()
    print("sleep cycle report")
    if corpus:
        stats = json.loads(corpus[1])
        print(f"  corpus {corpus[0]}: {stats['records_in']:,} records in = {stats['kept']:,} kept "
              f"+ {stats['quarantined']:,} quarantined + {stats['duplicates']:,} duplicates "
              f"(duplicate rate {stats['duplicate_rate']:.1%})")
    if version:
        m = json.loads(version[0])
        print(f"  data version {m['version_id']} (parent {m['parent_version']}): {m['total']:,} examples {m['counts']['per_split']}")
        print(f"  train file: {m['files']['train']}")
    from sleep_pipeline import candidates
    from sleep_pipeline.checkpoint import read_manifest
    from sleep_pipeline.gate.run import latest_report

    report = latest_report(db)
    known = candidates.list_candidates(db)
    cand = next((c for c in known if report and c.candidate_id == report.candidate_id), known[-1] if known else None)
    if cand and cand.phase == "compress":  # the training facts are the Learn candidate's it was compressed from
        learned = [a for a in candidates.ancestors(db, cand.candidate_id) if a.phase != "compress"]
        cand = learned[0] if learned else cand
    if cand and Path(cand.path).is_dir():
        m = read_manifest(Path(cand.path))
        print(f"  candidate {cand.short} ({cand.phase}, {cand.status}) {cand.path}: {m.get('steps')} steps, "
              f"{m.get('tokens', 0):,} tokens on {m.get('world_size')} ranks ({m.get('engine')}, ZeRO-{m.get('zero_stage')}) "
              f"in {m.get('wall_time_s', 0):.0f}s; validation loss {m.get('initial_validation_loss')} -> {m.get('validation_loss')}")
    _print_compress(db)
    _print_gate(db)
    print(f"  database: {db}")
    print("  browse lineage and metadata: DAGSTER_HOME=$PWD/.dagster_home .venv/bin/dagster dev   (http://127.0.0.1:3000)")
    return 0


def _print_compress(db: Path) -> None:
    from sleep_pipeline.compress.pareto import SCHEMA

    with connect(db) as con:
        con.execute(SCHEMA)
        rows = con.execute("SELECT kind, candidate_id, capability, size_mb, latency_ms_per_token_b1, selected, verdict "
                           "FROM compress_measurements WHERE run_id = (SELECT run_id FROM compress_measurements "
                           "ORDER BY created_at DESC LIMIT 1) ORDER BY size_mb DESC").fetchall()
    if not rows:
        return
    print("  compress (quick-suite capability, size, ms per token at batch 1):")
    for kind, cid, cap, size, ms, selected, verdict in rows:
        print(f"    {'*' if selected else ' '} {kind:15s} {cid[:12]}  {cap or 0:.3f}  {size or 0:8.1f} MB  {ms or 0:7.2f} ms  {verdict}")


def _print_gate(db: Path) -> None:
    from sleep_pipeline.gate.run import latest_report
    from sleep_pipeline.release.registry import get, live

    report = latest_report(db)
    if report is None:
        return
    v = report.verdict
    print(f"  gate {report.report_id} ({report.rhythm}): capability {'passed' if report.capability_passed else 'FAILED'}, "
          f"safety {'passed' if report.safety_passed else 'FAILED'} -> {report.decision} ({report.recommendation})")
    for line in report.failures:
        print(f"    - {line}")
    gains = [r for r in v["rows"] if r.get("beats_base") is not None]
    if gains:
        print(f"  vs the starting model: better beyond noise on {sum(r['beats_base'] for r in gains)}/{len(gains)} metrics")
    rel = live(db)
    if report.released_version:
        made = get(db, report.released_version)
        if made.gate_report_id == report.report_id:
            print(f"  RELEASED {report.released_version}: {report.candidate_path}")
        else:
            print(f"  unchanged: the candidate has the same weights as release {report.released_version}, nothing new "
                  f"released; live release: {rel.version if rel else 'none'}")
    else:
        print(f"  not released; live release: {rel.version if rel else 'none'}")
    print(f"  model card: {report.card_path}")


if __name__ == "__main__":
    sys.exit(main())
