"""Compress: what each compressed candidate saves and loses against its uncompressed parent, in one run.

    python bench/compress.py [--home DIR] [--recipes DIR] [--candidate ID] [--repeats 3] [--smoke]

Runs the Compress phase (merge, prune + recovery, distillation on the DeepSpeed launcher, int8) on a
Learn candidate of the storage directory ``--home`` (default ``$SLEEP_PIPELINE_HOME``; the newest Learn
candidate unless ``--candidate``), with the recipes of ``--recipes`` (default ``recipes``; the SmolLM2
profile: ``recipes/smollm2``). Then the cost of the parent and of every candidate is measured again
``--repeats`` times, interleaved (parent, candidate, parent, ...), because this machine's CPU capacity
drifts; ratios are medians. The frozen capability suites are judged again, whole by default (210 reasoning
and 160 tool-use items; ``--frozen-items N`` takes N of each): one item of the quick suite's 32 moves a
score by 3 points, too coarse for a 2-point target, and on SmolLM2 a 64-item sample said int8 lost 2.3
points where the whole suites say it gained 0.6. Prints JSON: per candidate the size ratio, the latency ratios (batch 1 and
the gate's batch), the capability delta on the frozen capability suites and on the whole quick suite,
and whether the selected candidate meets the targets: >= 2x smaller, >= 1.5x faster per token at
batch 1, <= 2 points lost on the frozen capability suites.

``--smoke`` (what the test suite runs): a storage directory of its own with a Learn candidate of a few
steps, a quick suite of 2 items, 2 distillation steps, one repeat. Its figures measure nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import json_stdout, parse_args  # noqa: E402

TARGETS = {"size_ratio": 2.0, "latency_ratio_b1": 1.5, "frozen_capability_points_lost": 2.0}
FROZEN_CAPABILITY = ("ho_reasoning", "ho_tool_use")
SMOKE = {"repeats": 1, "frozen_items": 2}


def launch_local(module: str, args: list[str], run_dir: Path, ranks: int = 2) -> str:
    """Run a training worker under the deepspeed launcher on this machine's CPUs (what the DeepSpeed
    resource does in a Dagster run, without Pipes); returns the checkpoint it published."""
    from resources.deepspeed import free_port

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           "--module", module, *args, "--run-dir", str(run_dir)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} exited with {proc.returncode}")
    return (run_dir / "last_checkpoint").read_text().strip()


def smoke_home(tmp: Path) -> tuple[Path, Path]:
    """A storage directory with a data mix and a Learn candidate of a few steps, and shrunk recipes."""
    import dagster as dg
    import yaml

    import definitions
    from tests.conftest import copy_recipes, shrink_compress
    from tests.test_learn_asset import _shrink_learn

    recipes = copy_recipes(tmp / "recipes")
    _shrink_learn(recipes, max_steps=4, eval_steps=4, save_steps=4)
    shrink_compress(recipes, examples=2, steps=2)
    raw = yaml.safe_load((recipes / "compress.yaml").read_text())
    raw["quick_suite"]["tasks"] = ["ho_reasoning", "ho_tool_use", "sp_perplexity"]
    (recipes / "compress.yaml").write_text(yaml.safe_dump(raw))
    home = tmp / "home"
    defs = definitions.build_defs(recipes, home)
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources,
                            instance=dg.DagsterInstance.ephemeral(),
                            selection=dg.AssetSelection.groups("learn").upstream())
    if not result.success:
        raise RuntimeError("the smoke Learn run failed")
    return home, recipes


def frozen_scores(db: Path, home: Path, parent, gate_recipe, points, items: int) -> dict[str, dict[str, dict[str, float]]]:
    """Every candidate's (and the parent's) headline score on the frozen capability suites, ``items`` each
    (0: all), loaded as served: per kind, ``{"score": {suite: value}, "stderr": {suite: value}}``."""
    from sleep_pipeline import candidates
    from sleep_pipeline.gate import run as gate_run
    from sleep_pipeline.gate.evaluate import evaluate, load_for_eval
    from sleep_pipeline.gate.judge import make_judge
    from sleep_pipeline.gate.suites import TASK_BY_NAME

    suites = gate_run.suites_for_candidate(db, home, parent, gate_recipe)
    out = {}
    for p in points:
        model, tok = load_for_eval(Path(candidates.get(db, p.candidate_id).path))
        ev = evaluate(model, tok, suites, tasks=list(FROZEN_CAPABILITY), limit=items or None, batch_size=gate_recipe.batch_size,
                      judge=make_judge(gate_recipe.judge), keep_samples=False, max_length=gate_recipe.max_context_tokens)
        headline = {t: ev.scores[t][TASK_BY_NAME[t].headline.name] for t in FROZEN_CAPABILITY if t in ev.scores}
        out[p.kind] = {"score": {t: round(m.value, 4) for t, m in headline.items()},
                       "stderr": {t: round(m.stderr or 0.0, 4) for t, m in headline.items()}}
        print(f"frozen capability of {p.kind}: {out[p.kind]['score']} ({items or 'all'} items each)", file=sys.stderr, flush=True)
        del model
    return out


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None)
    ap.add_argument("--recipes", type=Path, default=ROOT / "recipes")
    ap.add_argument("--candidate", default=None, help="the Learn candidate to compress (default: the newest)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frozen-items", type=int, default=0,
                    help="items per frozen capability suite the parent and every candidate are judged on again "
                         "(default 0: every item of the suites)")
    args = parse_args(ap, argv, SMOKE)
    emit = json_stdout()
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, Path(tmp), emit)


def run(args, tmp: Path, emit) -> int:
    from sleep_pipeline import candidates
    from sleep_pipeline.compress import run as compress_run
    from sleep_pipeline.compress.cost import measure
    from sleep_pipeline.compress.recipe import load_compress_recipe
    from sleep_pipeline.data.mix import manifest_of
    from sleep_pipeline.gate.decide import load_gate_recipe
    from sleep_pipeline.train.recipe import load_train_recipe

    if args.smoke:
        home, recipes = smoke_home(tmp)
    else:
        home = Path(args.home or os.environ.get("SLEEP_PIPELINE_HOME") or ROOT / ".sleep_pipeline").resolve()
        recipes = args.recipes.resolve()
    db = home / "sleep.duckdb"
    recipe = load_compress_recipe(recipes / "compress.yaml")
    gate_recipe = load_gate_recipe(recipes / "gate.yaml")
    if args.candidate:
        parent = candidates.get(db, args.candidate)
    else:
        learned = [c for c in candidates.list_candidates(db) if c.phase == "learn" and c.status not in candidates.GONE]
        if not learned:
            raise SystemExit(f"{db}: no Learn candidate to compress (run a cycle first, or give --candidate)")
        parent = learned[-1]

    def launch_distil(extra: list[str]) -> str:
        train_recipe = load_train_recipe(recipe.distil.recipe, home)
        data_dir = Path(manifest_of(db, parent.data_version)["files"]["train"]).parent
        return launch_local("sleep_pipeline.train.distil", [
            "--recipe", train_recipe.source, "--data-dir", str(data_dir),
            "--out-root", str(compress_run.checkpoints_root(home)), "--data-version", parent.data_version,
            "--db", str(db), "--storage-dir", str(home), *extra], tmp / "distil-run")

    out = compress_run.compress(db, home, parent.candidate_id, recipe, gate_recipe, launch_distil=launch_distil,
                                log=lambda m: print(m, file=sys.stderr, flush=True), force=True)
    by_kind = {p.kind: p for p in out.points}
    base = by_kind["parent"]
    costs: dict[str, list[dict]] = {p.kind: [] for p in out.points}
    for _ in range(args.repeats):  # interleaved: the parent beside every candidate, every repeat
        for p in out.points:
            costs[p.kind].append(measure(Path(candidates.get(db, p.candidate_id).path), batch_size=recipe.cost.batch_size,
                                         new_tokens=recipe.cost.new_tokens).to_json())
    med = {k: {m: statistics.median(c[m] for c in v) for m in ("latency_ms_per_token_b1", "latency_ms_per_token_batch",
                                                              "peak_memory_mb", "cpu_s_per_1k_tokens")}
           | {"size_mb": v[0]["size_mb"], "parameters": v[0]["parameters"]} for k, v in costs.items()}

    frozen = frozen_scores(db, home, parent, gate_recipe, out.points, args.frozen_items)

    def frozen_capability(point) -> float | None:
        vals = list(frozen[point.kind]["score"].values())
        return sum(vals) / len(vals) if vals else None

    report_candidates = {}
    for p in out.points:
        if p.kind == "parent":
            continue
        fc, fb = frozen_capability(p), frozen_capability(base)
        report_candidates[p.kind] = {
            "candidate_id": p.candidate_id,
            "size_ratio": ratio(med["parent"]["size_mb"], med[p.kind]["size_mb"]),
            "latency_ratio_b1": ratio(med["parent"]["latency_ms_per_token_b1"], med[p.kind]["latency_ms_per_token_b1"]),
            "latency_ratio_batch": ratio(med["parent"]["latency_ms_per_token_batch"], med[p.kind]["latency_ms_per_token_batch"]),
            "capability_delta_points": round(100 * (p.capability - base.capability), 2),
            "frozen_capability_delta_points": round(100 * (fc - fb), 2) if fc is not None and fb is not None else None,
            "frozen_capability": frozen[p.kind]["score"], "frozen_capability_stderr": frozen[p.kind]["stderr"],
            "reasoning_delta_points": round(100 * (p.groups.get("reasoning", 0) - base.groups.get("reasoning", 0)), 2),
            "distinct_2": p.groups.get("diversity"), "selected": p.selected, "verdict": p.verdict,
            "cost": med[p.kind],
        }
    chosen = next(p for p in out.points if p.selected)
    sel = report_candidates.get(chosen.kind)
    meets = None
    if sel:
        meets = {"size": (sel["size_ratio"] or 0) >= TARGETS["size_ratio"],
                 "latency_b1": (sel["latency_ratio_b1"] or 0) >= TARGETS["latency_ratio_b1"],
                 "frozen_capability": sel["frozen_capability_delta_points"] is not None
                 and -sel["frozen_capability_delta_points"] <= TARGETS["frozen_capability_points_lost"]}
    emit({"smoke": bool(args.smoke), "recipes": str(recipes), "parent": {"candidate_id": base.candidate_id,
          "capability": base.capability, "frozen_capability": frozen["parent"]["score"],
          "frozen_capability_stderr": frozen["parent"]["stderr"], "cost": med["parent"]},
          "frozen_items": args.frozen_items or "all",
          "repeats": args.repeats, "candidates": report_candidates, "selected": chosen.kind,
          "targets": TARGETS, "selected_meets_targets": meets, "compress_seconds": out.seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
