"""Gate evaluation throughput: the full suite batched vs one document at a time, in the same run.

    python bench/gate.py [--checkpoint DIR] [--limit N] [--batch-size 32] [--repeats 2] [--smoke]

Uses the newest Learn checkpoint and suites under ``SLEEP_PIPELINE_HOME`` (run the cycle first), or the
ones given. A (batch 1) and B (batched) alternate ``--repeats`` times, because this machine's CPU
capacity drifts; examples/s is the median over repeats. Prints JSON: both rates, the speed-up (target
≥ 5x), and whether the two sides scored the same (every metric, and per-document responses).

``--smoke`` (what the test suite runs): 2 documents a task, one repeat, and, unless given, a tiny
model and suites of its own, built in a temporary directory in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import json_stdout, parse_args  # noqa: E402
from sleep_pipeline.checkpoint import latest_checkpoint  # noqa: E402
from sleep_pipeline.gate.evaluate import evaluate, load_for_eval  # noqa: E402
from sleep_pipeline.gate.suites import build_suites  # noqa: E402

TARGET_SPEEDUP = 5.0
SUITE_SEED = 20261123
SMOKE = {"limit": 2, "repeats": 1}
PLACEHOLDER_VALIDATION = [{"record_id": "0", "prompt": "1 + 1 =", "response": "2"}]  # perplexity without a mix


def smoke_inputs(work: Path, per_task: int) -> tuple[Path, Path]:
    """Suites of ``per_task`` items and a tiny model trained for two steps on their items."""
    from tests.gate_helpers import train_candidate

    suites = build_suites(work / "suites", seed=SUITE_SEED, per_task=per_task, validation_rows=PLACEHOLDER_VALIDATION)
    rows = [{"system": d["system"], "prompt": d["prompt"], "response": d["target"], "bucket": d["bucket"]}
            for f in sorted(suites.glob("*.jsonl")) for d in map(json.loads, f.read_text().splitlines())]
    return train_candidate(rows, work / "checkpoints", "bench-smoke", steps=2), suites


def main(argv=None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return run(argv, Path(tmp))


def run(argv, tmp: Path) -> int:
    home = Path(os.environ.get("SLEEP_PIPELINE_HOME") or ROOT / ".sleep_pipeline")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--suites", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="documents per suite task (default: all, the full suite)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = parse_args(ap, argv, SMOKE)
    emit = json_stdout()
    if args.smoke and not (args.checkpoint and args.suites):
        own_ckpt, own_suites = smoke_inputs(tmp, args.limit)
        args.checkpoint, args.suites = args.checkpoint or own_ckpt, args.suites or own_suites
    ckpt = args.checkpoint or latest_checkpoint(home / "checkpoints" / "learn")
    if ckpt is None:
        print(f"no checkpoint under {home}/checkpoints/learn: run `bash scripts/cycle.sh` first or pass --checkpoint",
              file=sys.stderr)
        return 2
    suites = args.suites
    if suites is None:
        found = sorted((home / "suites").glob("suite-*"), key=lambda p: p.stat().st_mtime)
        suites = found[-1] if found else build_suites(home / "suites", seed=SUITE_SEED, per_task=args.limit or 120,
                                                      validation_rows=PLACEHOLDER_VALIDATION)
    model, tok = load_for_eval(ckpt)
    runs = {"one_at_a_time": [], "batched": []}
    task_runs = {"one_at_a_time": {}, "batched": {}}  # side -> task -> [seconds per repeat]
    results = {}
    for r in range(args.repeats):
        for side, bs in (("one_at_a_time", 1), ("batched", args.batch_size)) if r % 2 == 0 else \
                (("batched", args.batch_size), ("one_at_a_time", 1)):
            ev = evaluate(model, tok, suites, limit=args.limit, batch_size=bs,
                          log=lambda m, s=side: print(f"[{s}] {m}", file=sys.stderr))
            runs[side].append(ev.examples / ev.seconds)
            for t, sec in ev.task_seconds.items():
                task_runs[side].setdefault(t, []).append(sec)
            results[side] = ev
    a, b = results["one_at_a_time"], results["batched"]
    diffs = {f"{t}/{m}": abs(a.scores[t][m].value - b.scores[t][m].value) for t in a.scores for m in a.scores[t]}
    same_docs = total_docs = 0
    for t in a.samples:
        for x, y in zip(a.samples[t], b.samples[t]):
            total_docs += 1
            same_docs += x["response"] == y["response"]
    rate_a, rate_b = statistics.median(runs["one_at_a_time"]), statistics.median(runs["batched"])
    # where the batch helps least: long prompts and log-likelihood scoring are compute-bound at any batch size
    per_task = {t: {"one_at_a_time_s": round(statistics.median(task_runs["one_at_a_time"][t]), 2),
                    "batched_s": round(statistics.median(task_runs["batched"][t]), 2),
                    "speedup": round(statistics.median(task_runs["one_at_a_time"][t])
                                     / statistics.median(task_runs["batched"][t]), 2)}
                for t in task_runs["batched"]}
    emit({
        "benchmark": "gate_evaluation", "smoke": args.smoke,
        "checkpoint": str(ckpt), "suites": str(suites), "examples": a.examples, "repeats": args.repeats,
        "one_at_a_time_examples_per_s": round(rate_a, 2), "batched_examples_per_s": round(rate_b, 2),
        "batch_size": args.batch_size, "runs_examples_per_s": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "speedup": round(rate_b / rate_a, 2), "target_speedup": TARGET_SPEEDUP,
        "meets_target": rate_b / rate_a >= TARGET_SPEEDUP,
        "max_metric_difference": round(max(diffs.values()), 6),
        "differing_metrics": {k: round(v, 6) for k, v in diffs.items() if v > 0},
        "identical_responses": f"{same_docs}/{total_docs}",
        "per_task": per_task,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
