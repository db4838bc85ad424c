"""The Compress phase end to end: from the candidate Learn produced to the candidate the Gate receives.

Given a parent candidate (by id) it makes compressed candidates, each published through the checkpoint
contract and registered with the parent as its parent (``phase: compress``):

1. **merge** -- when the parent is a LoRA adapter: merged into its base behind an A/B check on the quick
   suite (:mod:`~sleep_pipeline.compress.merge`). A merge that regresses is skipped and recorded, and then
   nothing is derived from it: the unmerged parent passes through.
2. **pruned** -- structured pruning plus a short low-learning-rate recovery fine-tune
   (:mod:`~sleep_pipeline.compress.prune`).
3. **distilled** -- the pruned model as student, the live release as teacher (the parent when nothing
   is live, or when the live release speaks another tokenizer), run on the DeepSpeed resource by the
   caller's ``launch_distil`` (:mod:`sleep_pipeline.train.distil`).
4. **int8** -- of the sources the recipe names (:mod:`~sleep_pipeline.compress.quantize`).

Then every candidate and the parent are measured in this one run, the same way (quick suite, validation
perplexity, diversity, cost: :mod:`~sleep_pipeline.compress.measure`), recorded in DuckDB, and the
cheapest candidate on the Pareto front within the red lines is selected
(:mod:`~sleep_pipeline.compress.pareto`). The same parent and recipe again: the recorded run's choice is
returned without compressing again.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sleep_pipeline import candidates
from sleep_pipeline.checkpoint import CheckpointError, publish, staging_dir, verify_checkpoint
from sleep_pipeline.compress import measure, pareto, prune as pruning, quantize
from sleep_pipeline.compress.cost import measure as measure_cost
from sleep_pipeline.compress.merge import adapter_base, merge_adapters
from sleep_pipeline.compress.recipe import CompressRecipe
from sleep_pipeline.data.mix import manifest_of
from sleep_pipeline.gate.evaluate import load_for_eval
from sleep_pipeline.store import connect, query_dicts
from sleep_pipeline.train.modeling import ADAPTER_CONFIG, completion_tensors, read_jsonl

PHASE = "compress"
SUBDIR = "compress"


class CompressError(RuntimeError):
    """Compress cannot run on this candidate; the message says why."""


@dataclass
class CompressOutcome:
    run_id: str
    parent: candidates.Candidate
    selected: candidates.Candidate
    points: list[pareto.Point]
    notes: list[str] = field(default_factory=list)
    merge_steps: list[dict] = field(default_factory=list)
    unchanged: bool = False
    seconds: float = 0.0


def checkpoints_root(storage_root: Path) -> Path:
    return Path(storage_root) / "checkpoints" / SUBDIR


def _lineage(parent: candidates.Candidate, recipe: CompressRecipe, kind: str, details: dict) -> dict:
    return {"phase": PHASE, "kind": PHASE, "parents": [parent.candidate_id], "data_version": parent.data_version,
            "recipe_hash": recipe.recipe_hash(), "recipe": recipe.source, "base_model": parent.path,
            "compression": kind, "compression_details": details}


def publish_model(storage_root: Path, db_path: Path, model, tokenizer, info: dict, name: str,
                  int8: tuple | None = None, subdir: str = SUBDIR) -> candidates.Candidate:
    """Write ``model`` (or, given ``int8=(tensors, description)``, its int8 form) through the checkpoint
    contract under ``<storage>/checkpoints/<subdir>`` and register it (phase: ``info['phase']``)."""
    root = Path(storage_root) / "checkpoints" / subdir
    stage = staging_dir(root, name)
    if int8 is None:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        reload = lambda p: load_for_eval(p)  # noqa: E731
    else:
        quantize.save_int8(model, tokenizer, int8[0], int8[1], stage)
        reload = quantize.load_int8
    final, _ = publish(stage, root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", info, reload=reload)
    return candidates.register(db_path, final, info.get("phase", PHASE))


def batches(tokenizer, rows: list[dict], size: int, max_len: int) -> list[dict]:
    return [completion_tensors(tokenizer, rows[i:i + size], max_len) for i in range(0, len(rows), size)]


def previous_run(db_path: Path, parent_id: str, recipe_hash: str) -> str | None:
    """The latest recorded run of this recipe on this parent whose selected candidate still verifies."""
    with connect(db_path) as con:
        con.execute(pareto.SCHEMA)
        rows = query_dicts(con, "SELECT run_id, candidate_id FROM compress_measurements WHERE parent_id = ? AND "
                                "recipe_hash = ? AND selected ORDER BY created_at DESC", [parent_id, recipe_hash])
    for r in rows:
        try:
            cand = candidates.get(db_path, r["candidate_id"])
            if cand.status not in candidates.GONE:
                verify_checkpoint(Path(cand.path))
                return r["run_id"]
        except (candidates.CandidateError, CheckpointError):
            continue
    return None


def recorded_outcome(db_path: Path, run_id: str) -> CompressOutcome:
    with connect(db_path) as con:
        con.execute(pareto.SCHEMA)
        rows = query_dicts(con, "SELECT * FROM compress_measurements WHERE run_id = ? ORDER BY created_at", [run_id])
    points = []
    for r in rows:
        m = json.loads(r["measurement"])
        p = pareto.Point(r["candidate_id"], r["kind"], r["capability"] or 0.0, m.get("cost_axis", 0.0),
                         m.get("groups", {}), m, r["on_front"], r["within_red_lines"], r["selected"], r["verdict"])
        points.append(p)
    chosen = next(p for p in points if p.selected)
    parent = next(p for p in points if p.kind == "parent")
    return CompressOutcome(run_id, candidates.get(db_path, parent.candidate_id), candidates.get(db_path, chosen.candidate_id),
                           points, notes=json.loads(rows[0]["measurement"]).get("notes", []), unchanged=True)


def teacher_for(db_path: Path, parent: candidates.Candidate, tokenizer, log) -> tuple[str, str]:
    """(teacher reference, why): the live release when it speaks the student's tokenizer, else the parent."""
    from sleep_pipeline.compress.distil import same_vocabulary
    from sleep_pipeline.release import registry
    from sleep_pipeline.train.modeling import load_tokenizer

    live = registry.live(db_path)
    if live is None:
        return parent.candidate_id, "the parent (nothing is live)"
    try:
        live_tok = load_tokenizer(Path(live.checkpoint_path))
    except (OSError, ValueError) as exc:
        return parent.candidate_id, f"the parent (the live release {live.version} cannot be read: {exc})"
    if not same_vocabulary(tokenizer, live_tok):
        return parent.candidate_id, f"the parent (the live release {live.version} uses another tokenizer)"
    return live.checkpoint_sha256, f"the live release {live.version}"


def compress(db_path: Path, storage_root: Path, parent_ref: str, recipe: CompressRecipe, gate_recipe,
             launch_distil: Callable[[list[str]], str] | None = None, log=print, force: bool = False) -> CompressOutcome:
    """Compress candidate ``parent_ref`` (see the module docstring). ``launch_distil(args)`` runs the
    distillation worker with these arguments and returns the checkpoint it published."""
    from sleep_pipeline.gate import run as gate_run
    from sleep_pipeline.gate.judge import make_judge

    t0 = time.monotonic()
    log = log or (lambda _m: None)
    parent = candidates.get(db_path, parent_ref)
    parent_dir = Path(parent.path)
    if parent.status in candidates.GONE or not parent_dir.is_dir():
        raise CompressError(f"candidate {parent.short} has no files any more (status {parent.status})")
    try:
        verify_checkpoint(parent_dir)
    except CheckpointError as exc:
        raise CompressError(f"candidate {parent.short} does not verify: {exc}") from exc
    if not force:
        prior = previous_run(db_path, parent.candidate_id, recipe.recipe_hash())
        if prior:
            out = recorded_outcome(db_path, prior)
            log(f"unchanged: run {prior} compressed candidate {parent.short} with this recipe; its choice "
                f"{out.selected.short} ({next(p.kind for p in out.points if p.selected)}) stands")
            return out
    if not parent.data_version:
        raise CompressError(f"candidate {parent.short} records no data version: nothing to calibrate and measure on")
    files = manifest_of(db_path, parent.data_version)["files"]
    train_rows, val_rows = read_jsonl(Path(files["train"])), read_jsonl(Path(files["validation"]))
    suites = gate_run.suites_for_candidate(db_path, storage_root, parent, gate_recipe, log=log)
    judge = make_judge(gate_recipe.judge)
    qs = recipe.quick_suite
    run_id = f"compress-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    notes: list[str] = []
    merge_steps: list[dict] = []

    def evaluate(model, tok, label: str, diversity: bool = True) -> measure.Measurement:
        log(f"measuring {label} on the quick suite ({len(qs.tasks)} tasks x {qs.examples} items)"
            + (" and diversity" if diversity else ""))
        return measure.measure_model(model, tok, suites, list(qs.tasks), qs.examples, gate_recipe.batch_size, judge,
                                     gate_recipe.max_context_tokens, qs.diversity_samples if diversity else 0, log=log)

    with candidates.lease(db_path, parent.candidate_id, f"compress {run_id}"):
        served, tok = load_for_eval(parent_dir)
        made: list[tuple[str, candidates.Candidate]] = []
        reuse: dict[str, measure.Measurement] = {}  # candidate id -> its quick-suite result, already measured
        source, source_cand = served, parent  # the float model compressed candidates are derived from
        derive = True
        if quantize.is_int8(parent_dir):
            notes.append("the parent is already int8: nothing further is derived from it")
            derive = False
        elif (parent_dir / ADAPTER_CONFIG).is_file():
            if recipe.merge.enabled:
                from sleep_pipeline.train.modeling import load_pretrained

                base = load_pretrained(adapter_base(parent_dir))
                sides: dict[int, measure.Measurement] = {}

                def score(m):
                    sides[id(m)] = evaluate(m, tok, "a merge A/B side", diversity=False)
                    return sides[id(m)].groups

                res = merge_adapters(base, [parent_dir], score, recipe.merge.max_drop, log=log)
                merge_steps = [s.__dict__ for s in res.steps]
                if res.merged:
                    cand = publish_model(storage_root, db_path, res.model, tok,
                                          _lineage(parent, recipe, "merged", {"adapters": res.merged}), "merged")
                    made.append(("merged", cand))
                    source, source_cand = res.model, cand
                    # the A/B check's B side is this very model on this very suite: not evaluated twice
                    reuse[cand.candidate_id] = sides[id(res.model)]
                else:
                    notes.append("the LoRA merge was skipped (it regresses: " + "; ".join(s.reason for s in res.steps)
                                 + "); the unmerged parent passes through and nothing is derived from it")
                    derive = False
            else:
                notes.append("merge disabled: the adapter is merged in memory only to derive the compressed models")
        pruned_cand = None
        if derive and recipe.prune.enabled:
            p = recipe.prune
            calib = batches(tok, train_rows[: p.calibration_rows], p.batch_size, p.max_seq_len)
            log(f"pruning: keeping {p.mlp_keep:.0%} of the MLP neurons and {p.heads_keep:.0%} of the query heads per layer")
            res = pruning.prune(source, calib, p.mlp_keep, p.heads_keep)
            log(f"pruned: intermediate {res.intermediate_size[0]} -> {res.intermediate_size[1]}, heads "
                f"{res.attention_heads[0]} -> {res.attention_heads[1]} (key/value {res.key_value_heads[0]} -> "
                f"{res.key_value_heads[1]}), parameters {res.parameters[0]:,} -> {res.parameters[1]:,}")
            import torch

            torch.manual_seed(0)
            recovery_rows = train_rows[p.calibration_rows:] or train_rows
            losses = pruning.recover(res.model, batches(tok, recovery_rows, p.batch_size, p.max_seq_len),
                                     p.recovery_steps, p.recovery_learning_rate, log=log)
            details = {"mlp_keep": p.mlp_keep, "heads_keep": p.heads_keep, "intermediate_size": list(res.intermediate_size),
                       "attention_heads": list(res.attention_heads), "key_value_heads": list(res.key_value_heads),
                       "parameters": list(res.parameters), "recovery_steps": p.recovery_steps,
                       "recovery_loss": [round(losses[0], 4), round(losses[-1], 4)] if losses else None}
            pruned_cand = publish_model(storage_root, db_path, res.model, tok,
                                         _lineage(source_cand, recipe, "pruned", details), "pruned")
            made.append(("pruned", pruned_cand))
        distilled_cand = None
        if derive and pruned_cand is not None and recipe.distil.enabled:
            if launch_distil is None:
                notes.append("distillation skipped: no training resource to run it on")
            else:
                teacher, why = teacher_for(db_path, parent, tok, log)
                log(f"distilling the pruned model from {why}")
                path = launch_distil(["--init-from", pruned_cand.candidate_id, "--teacher", teacher,
                                      "--temperature", str(recipe.distil.temperature),
                                      "--kl-weight", str(recipe.distil.kl_weight)])
                distilled_cand = candidates.register(db_path, Path(path), PHASE)
                made.append(("distilled", distilled_cand))
                notes.append(f"distillation teacher: {why}")
        if derive and recipe.quantize.enabled:
            qz = recipe.quantize
            calib = batches(tok, train_rows[: qz.calibration_rows], 4, qz.max_seq_len) if qz.smooth_alpha > 0 else None
            sources = {"parent": (source, source_cand), "pruned": (None, pruned_cand), "distilled": (None, distilled_cand)}
            for name in recipe.quantize.sources:
                model, of = sources[name]
                if of is None:
                    continue
                if model is None:
                    model, _ = load_for_eval(Path(of.path))
                else:
                    import copy

                    model = copy.deepcopy(model)
                qmodel, tensors, info = quantize.quantize(model, calibration=calib, alpha=qz.smooth_alpha)
                kind = "int8" if name == "parent" else f"{name}+int8"
                made.append((kind, publish_model(storage_root, db_path, qmodel, tok,
                                                  _lineage(of, recipe, kind, {"method": info["method"], "of": name,
                                                                              "smoothquant": info["smoothquant"]}),
                                                  kind.replace("+", "-"),
                                                  int8=(tensors, info))))
        del served, source
        points = []
        for kind, cand in [("parent", parent), *made]:
            model, mtok = load_for_eval(Path(cand.path))
            if cand.candidate_id in reuse:
                m = reuse[cand.candidate_id]
                log(f"{kind} {cand.short}: the quick suite as measured in the merge's A/B check; diversity now")
                m.diversity = measure.sample_diversity(model, mtok, samples_per_prompt=qs.diversity_samples)
            else:
                m = evaluate(model, mtok, f"{kind} {cand.short}")
            del model
            log(f"measuring the cost of {kind} {cand.short} (a fresh process: size, latency, peak memory, CPU time)")
            c = measure_cost(Path(cand.path), batch_size=recipe.cost.batch_size, new_tokens=recipe.cost.new_tokens)
            m.cost = c.to_json()
            groups = {**m.groups, "diversity": m.diversity.get("distinct_2")}
            row = {**m.to_json(), "groups": groups, "cost_axis": c.to_json()[recipe.cost.metric],
                   "recipe_hash": recipe.recipe_hash(), "notes": notes}
            points.append(pareto.Point(cand.candidate_id, kind, groups.get("capability", 0.0),
                                       c.to_json()[recipe.cost.metric], groups, row))
            log(f"{kind} {cand.short}: capability {groups.get('capability', 0):.3f}, reasoning "
                f"{groups.get('reasoning', float('nan')):.3f}, distinct-2 {groups.get('diversity') or 0:.3f}, "
                f"{c.size_mb:.1f} MB, {c.latency_ms_per_token_b1:.2f} ms/token at batch 1, "
                f"{c.latency_ms_per_token_batch:.2f} at batch {c.batch_size}")
    chosen = pareto.select(points, recipe.red_lines)
    pareto.record(db_path, run_id, parent.candidate_id, recipe.recipe_hash(), points)
    for p in points:  # what was not chosen never reaches a gate; retention may delete it like any rejected one
        if p.kind != "parent" and not p.selected:
            candidates.mark(db_path, p.candidate_id, candidates.REJECTED, f"{run_id}: not selected ({p.verdict})")
    candidates.retain(db_path, checkpoints_root(storage_root), recipe.keep_last, log=log)
    selected = candidates.get(db_path, chosen.candidate_id)
    log(f"selected {chosen.kind} {selected.short}: {chosen.verdict}")
    return CompressOutcome(run_id, parent, selected, points, notes, merge_steps, seconds=round(time.monotonic() - t0, 1))
