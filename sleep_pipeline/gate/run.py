"""The Gate phase end to end: suites for a candidate's data version, evaluate, decide, record, card,
release.

Everything is bound to a candidate id (:mod:`sleep_pipeline.candidates`, the content digest of the
checkpoint): ``run_gate`` evaluates the candidate it is given, with suites held out from *that
candidate's* data version, and stores the verdict in DuckDB (``gate_reports``) with the digest;
``release_gated`` releases the candidate of the report it is given, and only if that report passed,
no gate of the same or a stricter rhythm rejected the same digest (no gate shopping: an explicit
override with a recorded reason is the only way past that), and the files still hash to the digest.
Moving ``live``, marking the report released and the candidate released are one transaction.

A failed gate keeps ``live`` where it is, records the rejection in the release history, and feeds the
failing items (with their reference answers), stratified across buckets, to the hard-example replay
table, which the next data mix draws from; the next suites then leave those items out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sleep_pipeline import candidates
from sleep_pipeline.checkpoint import CARD, CheckpointError, read_manifest, sha256_file, verify_checkpoint
from sleep_pipeline.config import stable_hash
from sleep_pipeline.data import replay
from sleep_pipeline.data.mix import manifest_of
from sleep_pipeline.fsio import write_atomic
from sleep_pipeline.gate import heldout, model_card
from sleep_pipeline.gate.decide import RHYTHMS, GateRecipe, Reference, Verdict, beats, decide, failed_checks
from sleep_pipeline.gate.evaluate import Evaluation, evaluate, load_for_eval
from sleep_pipeline.gate.judge import make_judge
from sleep_pipeline.gate.scoring import scoring_version
from sleep_pipeline.gate.suites import (CAPABILITY, FROZEN_TASKS, MANIFEST, PERPLEXITY, SAFETY, TASK_BY_NAME, build_suites,
                                        prompt_key, suite_version)
from sleep_pipeline.release import registry
from sleep_pipeline.store import connect, query_dicts, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS gate_reports (
    report_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, rhythm VARCHAR, candidate_path VARCHAR,
    candidate_sha256 VARCHAR, data_version VARCHAR, suite_version VARCHAR, live_version VARCHAR,
    capability_passed BOOLEAN, safety_passed BOOLEAN, decision VARCHAR, recommendation VARCHAR,
    verdict VARCHAR, card_path VARCHAR, released_version VARCHAR, recipe_hash VARCHAR
);
CREATE TABLE IF NOT EXISTS gate_evaluations (
    cache_key VARCHAR PRIMARY KEY, model_ref VARCHAR, suite_version VARCHAR, created_at TIMESTAMP,
    evaluation VARCHAR
);
CREATE TABLE IF NOT EXISTS gate_overrides (
    candidate_sha256 VARCHAR, reason VARCHAR, created_at TIMESTAMP
);
"""


class GateError(RuntimeError):
    """The gate or the release step refused; the message says why."""


@dataclass(frozen=True)
class GateReport:
    report_id: str
    created_at: object
    rhythm: str
    candidate_path: str
    candidate_sha256: str
    data_version: str
    suite_version: str
    live_version: str | None
    capability_passed: bool
    safety_passed: bool
    decision: str
    recommendation: str
    verdict: dict
    card_path: str
    released_version: str | None
    recipe_hash: str

    @property
    def passed(self) -> bool:
        return self.capability_passed and self.safety_passed

    @property
    def candidate_id(self) -> str:
        return self.candidate_sha256

    @property
    def failures(self) -> list[str]:
        """The stored verdict's failed thresholds and regressions, capability first."""
        return self.verdict.get("capability_failures", []) + self.verdict.get("safety_failures", [])


def ensure_schema(db_path: Path) -> None:
    with connect(db_path) as con:
        con.execute(SCHEMA)


# ------------------------------------------------------------------------------------------ suites
def suites_for_mix(storage_root: Path, manifest: dict, recipe: GateRecipe, log=None) -> Path:
    """The suites for a data version: every mix prompt excluded, perplexity on its test split."""
    files = manifest["files"]
    excluded, test_rows = set(), []
    for split, path in files.items():
        if not Path(path).exists():
            raise GateError(f"data version {manifest['version_id']}: {path} is gone (data versions past "
                            "keep_versions are pruned); its suites cannot be checked against it")
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                row = json.loads(line)
                if split == "test":
                    test_rows.append(row)
                else:
                    excluded.add(prompt_key(row.get("system"), row["prompt"]))
    return build_suites(Path(storage_root) / "suites", recipe.suite_seed, max(recipe.examples.values()),
                        exclude_prompts=excluded, validation_rows=test_rows[: recipe.perplexity_texts], log=log)


def data_manifest(db_path: Path, version_id: str) -> dict:
    try:
        return manifest_of(db_path, version_id)
    except KeyError as exc:
        raise GateError(str(exc.args[0])) from None


def frozen_version(suites: Path) -> str | None:
    """The version of the frozen held-out suites in ``suites`` (the same in every cycle while the shipped
    pools and their task definitions are unchanged)."""
    return json.loads((Path(suites) / MANIFEST).read_text()).get("frozen_version")


def suites_for_candidate(db_path: Path, storage_root: Path, cand: candidates.Candidate, recipe: GateRecipe,
                         log=None) -> Path:
    """The suites held out from the candidate's own data version."""
    if not cand.data_version:
        raise GateError(f"candidate {cand.short} records no data version: its suites cannot be held out from it")
    return suites_for_mix(storage_root, data_manifest(db_path, cand.data_version), recipe, log=log)


def frozen_contamination(db_path: Path, cand: candidates.Candidate, suites: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Frozen held-out items whose request occurs in what the candidate or any ancestor trained on (the
    train and validation splits of their data versions, replayed hard examples included). Returns
    (failures by check, risks): a contaminated frozen suite fails its check, because it no longer
    measures generalisation; a data version that can no longer be read is a risk item."""
    prompts, risks, seen = [], [], set()
    for a in candidates.ancestors(db_path, cand.candidate_id):
        files = {}
        try:  # a Dream fine-tune's own training set (its blend) besides its data version
            dreamed = read_manifest(Path(a.path)).get("training_data") if a.phase == "dream" else None
        except CheckpointError:
            dreamed = None
        if dreamed and dreamed not in seen:
            seen.add(dreamed)
            files.update({f"dream {split}": str(Path(dreamed) / f"{split}.jsonl") for split in ("train", "validation")})
        if a.data_version and a.data_version not in seen:
            seen.add(a.data_version)
            try:
                files.update(manifest_of(db_path, a.data_version)["files"])
            except KeyError:
                risks.append(f"data version {a.data_version} of {a.short} is no longer recorded: the frozen suites "
                             "could not be checked against it")
        for split, path in files.items():
            if split == "test":
                continue
            if not Path(path).exists():
                risks.append(f"{path} ({a.data_version}) is gone: the frozen suites could not be checked against it")
                continue
            with open(path, encoding="utf-8") as fh:
                for row in (json.loads(line) for line in fh if line.strip()):
                    prompts.append(row["prompt"])  # and the user turns before it (a multi-turn dream row)
                    prompts.extend(m["content"] for m in row.get("history") or () if m.get("role") == "user")
    docs = {}
    for task in FROZEN_TASKS:
        path = Path(suites) / f"{task.name}.jsonl"
        if path.exists():
            with open(path, encoding="utf-8") as fh:
                docs[task.name] = [json.loads(line) for line in fh if line.strip()]
    failures: dict[str, list[str]] = {CAPABILITY: [], SAFETY: []}
    for task, ids in heldout.contamination(docs, prompts).items():
        kind = SAFETY if TASK_BY_NAME[task].kind == SAFETY else CAPABILITY
        failures[kind].append(f"{task}: {len(ids)} frozen held-out item(s) occur in the training data of this "
                              f"candidate's lineage (e.g. {', '.join(ids[:3])}); the suite no longer measures "
                              "generalisation")
    return failures, risks


# -------------------------------------------------------------------------------------- evaluation
def _cached(db_path: Path, key: str) -> Evaluation | None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute("SELECT evaluation FROM gate_evaluations WHERE cache_key = ?", [key]).fetchall()
    return Evaluation.from_json(json.loads(rows[0][0])) if rows else None


def _store_eval(db_path: Path, key: str, model_ref: str, suites: str, ev: Evaluation) -> None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        con.execute("DELETE FROM gate_evaluations WHERE cache_key = ?", [key])
        con.execute("INSERT INTO gate_evaluations VALUES (?, ?, ?, ?, ?)",
                    [key, model_ref, suites, utcnow(), json.dumps(ev.to_json())])


def user_tasks_version(user_tasks) -> list:
    """What the user's tasks are: name, metrics, and the bytes of their directory (None: lm-eval's registry,
    versioned by the lm-eval release in the scoring version)."""
    out = []
    for t in user_tasks:
        files = sorted(p for p in Path(t.include_path).rglob("*") if p.is_file()) if t.include_path else []
        out.append([t.name, t.kind, [[m.name, m.higher_is_better] for m in t.metrics],
                    [[str(f.relative_to(t.include_path)), sha256_file(f)] for f in files]])
    return out


def evaluation_key(model_ref: str, suites: Path, limit: int, judge, user_tasks=(), max_context: int | None = None) -> str:
    """What a stored evaluation depends on: the model, the suites and the user's tasks, how many items, and
    the code and judge that turn generations into scores (a change to either makes older scores stale)."""
    return stable_hash({"model": model_ref, "suites": suite_version(suites), "limit": limit,
                        "scoring": scoring_version(judge), "user_tasks": user_tasks_version(user_tasks),
                        "context": max_context})


def trained_ancestor(db_path: Path, candidate: Path) -> Path:
    """The candidate itself, or for a Compress or Dream candidate the Learn checkpoint its compression and
    dreaming started from (a pruned, int8 or dreamed model is compared with the model its cycle started
    from, like its parent)."""
    for _ in range(16):
        manifest = read_manifest(candidate)
        parents = manifest.get("parents") or []
        if manifest.get("phase") not in ("compress", "dream") or not parents:
            break
        try:
            candidate, _cand = candidates.resolve(db_path, parents[0])
        except candidates.CandidateError:
            break
    return Path(candidate)


def starting_model(db_path: Path, candidate: Path):
    """The model the candidate's cycle started from (through :func:`trained_ancestor`): its parent candidate, else the base model directory it
    names, else the same architecture freshly initialised with the Learn recipe's seed. Returns
    (cache ref, loader, label, directory or None); the model is only built when the loader is called (not
    on a cached evaluation)."""
    from transformers import AutoConfig

    candidate = trained_ancestor(db_path, candidate)
    manifest = read_manifest(candidate)
    for parent in manifest.get("parents") or []:
        try:
            path, cand = candidates.resolve(db_path, parent)
        except candidates.CandidateError:
            continue
        label = (f"the imported model {parent[:12]}" if cand is not None and cand.phase == "import"
                 else f"the parent candidate {parent[:12]}")
        return f"candidate:{parent}", (lambda p=path: load_for_eval(p)), label, path
    base = manifest.get("base_model")
    if base and base != "built from config" and Path(base).is_dir():
        return f"base:{base}", lambda: load_for_eval(Path(base)), "the base model", Path(base)
    seed = 0
    try:
        from sleep_pipeline.train.recipe import load_train_recipe

        seed = load_train_recipe(manifest["recipe"]).training.seed
    except Exception:  # the recipe moved or changed shape: any fixed seed gives an untrained model
        pass
    config = AutoConfig.from_pretrained(candidate, local_files_only=True)
    ref = "untrained:" + stable_hash({"config": config.to_dict(), "seed": seed,
                                      "tokenizer": sha256_file(candidate / "tokenizer.json")
                                      if (candidate / "tokenizer.json").exists() else ""})

    def load():
        import torch
        from transformers import AutoModelForCausalLM

        from sleep_pipeline.train.modeling import load_tokenizer

        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval(), load_tokenizer(candidate)

    return ref, load, "the untrained starting model", None


def _eval_cached(db_path, ref: str, load, suites: Path, limit: int, recipe: GateRecipe, judge, log,
                 label: str, cost_of: Path | None = None) -> Evaluation:
    key = evaluation_key(ref, suites, limit, judge, recipe.user_tasks, recipe.max_context_tokens)
    ev = _cached(db_path, key)
    if ev is not None:
        if log:
            log(f"{label}: reusing the stored evaluation of {ref[:40]} on {suite_version(suites)}")
        return ev
    model, tok = load()
    if log:
        log(f"evaluating {label} ({ref[:40]})")
    ev = evaluate(model, tok, suites, limit=limit, batch_size=recipe.batch_size, log=log, judge=judge,
                  keep_samples=False, user_tasks=recipe.user_tasks, max_length=recipe.max_context_tokens)
    if cost_of is not None:
        ev.cost = serving_cost(cost_of, recipe, log, label)
    _store_eval(db_path, key, ref, suite_version(suites), ev)
    return ev


def serving_cost(path: Path, recipe: GateRecipe, log, label: str) -> dict | None:
    """What ``path`` costs to serve (size, latency, memory, CPU time), measured in a fresh process; None
    (and a log line) when it cannot be measured, which never decides a gate."""
    from sleep_pipeline.compress.cost import CostError, measure

    if log:
        log(f"measuring what {label} costs to serve (a fresh process)")
    try:
        return measure(Path(path), batch_size=recipe.batch_size).to_json()
    except (CostError, OSError, ValueError) as exc:
        if log:
            log(f"the cost of {label} could not be measured: {exc}")
        return None


# --------------------------------------------------------------------------------------------- gate
def failing_items(samples: dict[str, list[dict]]) -> list[dict]:
    """Every item of a mix-derived suite the candidate got wrong (judged on its task's headline metric),
    as replay rows (prompt + reference answer), in suite order. Frozen held-out items are left out."""
    out = []
    for task, rows in samples.items():
        spec = TASK_BY_NAME.get(task)
        if spec is None or spec.kind == PERPLEXITY or spec.name == "sp_robustness" or spec.frozen:
            continue  # frozen held-out items never enter training: they would stop measuring generalisation
        h = spec.headline
        for s in rows:
            v = s["metrics"].get(h.name)
            if v is None:
                continue
            bad = (v < 1.0) if h.higher_is_better else (v > 0.0)
            d = s["doc"]
            if bad and d.get("target"):
                out.append({"example_id": d["id"], "bucket": d["bucket"], "system": d.get("system") or "",
                            "prompt": d["prompt"], "response": d["target"],
                            "meta": json.dumps({"suite": task, "failed_with": str(s["response"])[:500]})})
    return out


def prior_rejections(db_path: Path, candidate_sha256: str, rhythm: str, exclude: str | None = None) -> list[dict]:
    """Failed gate reports on the same digest from a rhythm as strict as ``rhythm`` or stricter: a
    looser (or equally strict) gate may not release what one of them rejected."""
    stricter = list(RHYTHMS[RHYTHMS.index(rhythm):])
    with connect(db_path) as con:
        con.execute(SCHEMA)
        return query_dicts(con, "SELECT report_id, rhythm, capability_passed, safety_passed FROM gate_reports "
                                "WHERE candidate_sha256 = ? AND NOT (capability_passed AND safety_passed) AND "
                                "rhythm IN (SELECT unnest(?::VARCHAR[])) AND report_id <> ? ORDER BY created_at",
                           [candidate_sha256, stricter, exclude or ""])


def override(db_path: Path, candidate_ref: str, reason: str) -> candidates.Candidate:
    """Allow a candidate that an earlier gate rejected to be released by a later passing gate; the
    reason is recorded and shows on its report and card."""
    if len(reason.strip()) < 10:
        raise GateError("an override needs a reason (a sentence)")
    cand = candidates.get(db_path, candidate_ref)
    with connect(db_path) as con:
        con.execute(SCHEMA)
        con.execute("INSERT INTO gate_overrides VALUES (?, ?, ?)", [cand.candidate_id, reason.strip(), utcnow()])
    return cand


def _override_reason(db_path: Path, candidate_sha256: str) -> str | None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute("SELECT reason FROM gate_overrides WHERE candidate_sha256 = ? ORDER BY created_at DESC",
                           [candidate_sha256]).fetchall()
    return rows[0][0] if rows else None


def _shopping_failures(db_path: Path, sha: str, rhythm: str, exclude: str | None = None) -> dict[str, list[str]]:
    """Failure lines, per check, for earlier rejections of this digest that block a release now."""
    blocked: dict[str, list[str]] = {"capability": [], "safety": []}
    if _override_reason(db_path, sha):
        return blocked
    for r in prior_rejections(db_path, sha, rhythm, exclude):
        for kind in ("capability", "safety"):
            if not r[f"{kind}_passed"]:
                blocked[kind].append(f"candidate {sha[:12]} was rejected by {r['report_id']} ({r['rhythm']}): a "
                                     f"{rhythm} gate cannot release it (sleep-pipeline gate override "
                                     f"{sha[:12]} --reason ... is the only way)")
    return blocked


def _card_facts(report: GateReport, verdict: Verdict, manifest: dict, decision: str, version: str) -> model_card.CardFacts:
    rows = [model_card.MetricRow(r.task, r.metric, r.value, r.stderr, r.threshold, r.higher_is_better, r.live,
                                 r.passed, base=r.base, base_stderr=r.base_stderr, kind=r.kind)
            for r in (verdict.rows if isinstance(verdict, Verdict) else [])]
    lineage = {
        "candidate": f"{report.candidate_sha256} ({manifest.get('phase') or manifest.get('kind', '?')})",
        "candidate checkpoint": report.candidate_path,
        "parent candidates": ", ".join(p[:12] for p in manifest.get("parents") or []) or "none",
        "trained from": manifest.get("base_model", "?"),
        "Learn recipe hash": manifest.get("recipe_hash", "?"),
        "gate recipe hash": report.recipe_hash,
        "evaluation suites": report.suite_version,
        "frozen held-out suites": report.verdict.get("frozen_version") or "?",
        "gate report": report.report_id,
        "rhythm": report.rhythm,
        "compared with release": report.live_version or "none (first release)",
        **({"compression": f"{manifest['compression']} of {(manifest.get('parents') or ['?'])[0][:12]}"}
           if manifest.get("compression") else {}),
        "training": (f"{manifest.get('steps', '?')} steps, {manifest.get('tokens', '?')} tokens, "
                     f"validation loss {manifest.get('initial_validation_loss')} -> {manifest.get('validation_loss')}"
                     if manifest.get("steps") is not None else "none of its own (see its parent's manifest)"),
    }
    risks = list(verdict.failures) + list(verdict.risks)
    for task, n in sorted((report.verdict.get("truncated") or {}).items()):
        risks.append(f"{task}: {n} prompt(s) longer than the model's context were truncated from the left "
                     "(the request kept, as a chat server would)")
    return model_card.CardFacts(
        name="sleep-pipeline-model", version=version, decision=decision,
        base_model=manifest.get("base_model", "built from config"), data_version=report.data_version,
        datasets=[f"sleep-pipeline/{report.data_version}"], lineage=lineage, metrics=rows, risks=risks,
        recommendation=verdict.recommendation,
        base_label=report.verdict.get("starting_model") or "the untrained starting model",
        cost=report.verdict.get("cost") or {},
        dream=report.verdict.get("dream"),
    )


def write_card(report: GateReport, verdict: Verdict, decision: str, version: str) -> str:
    """Render the card, save it in the report's card path and beside the weights (not part of the
    checkpoint digest); returns the Markdown."""
    candidate = Path(report.candidate_path)
    text = model_card.render(_card_facts(report, verdict, read_manifest(candidate), decision, version))
    write_atomic(report.card_path, text)
    if candidate.is_dir():
        write_atomic(candidate / CARD, text)
    return text


def dream_deltas(after: Evaluation, before: Evaluation, policy) -> list[dict]:
    """Every gate metric of the dreamed candidate against the candidate Dream started from, with whether
    the change is beyond the combined standard error."""
    out = []
    for r in decide(after, Reference(base=before), policy).rows:
        if r.base is None:
            continue
        better = beats(r.value, r.stderr, r.base, r.base_stderr, r.higher_is_better)
        worse = beats(r.base, r.base_stderr, r.value, r.stderr, r.higher_is_better)
        out.append({"task": r.task, "metric": r.metric, "kind": r.kind, "higher_is_better": r.higher_is_better,
                    "before": r.base, "before_stderr": r.base_stderr, "after": r.value, "after_stderr": r.stderr,
                    "delta": r.value - r.base, "change": "better" if better else "worse" if worse else "within noise"})
    return out


def _dream_facts(db_path: Path, candidate: Path, auto_approve: bool, evaluate_before, log) -> dict | None:
    """What the report says about Dream: the dream set behind the candidate, the state of its people's
    spot-check (which blocks the release unless reviewed or auto-approved), and the deltas against the
    candidate Dream started from."""
    from sleep_pipeline.dream import rater
    from sleep_pipeline.dream.finetune import dream_source

    dream_id, before_id = dream_source(db_path, candidate)
    if dream_id is None:
        return None
    blocks, said = rater.release_block(db_path, dream_id, auto_approve)
    facts = {"dream_id": dream_id, "before": before_id,
             "spot_check": {"dream_id": dream_id, "auto_approve": auto_approve, "status": said, "blocks_release": blocks}}
    if before_id:
        facts["deltas"] = evaluate_before(before_id)
    if log:
        log(f"dream batch {dream_id}: {said}")
    return facts


def run_gate(db_path: Path, storage_root: Path, candidate_id: str, recipe: GateRecipe, rhythm: str,
             log=None, suites: Path | None = None, auto_approve: bool = False) -> tuple[GateReport, Verdict, Evaluation]:
    """Evaluate candidate ``candidate_id`` (and the live release, and the model it started from) on the
    suites held out from its own data version, decide, store the report, write the card; on a failed
    gate record the rejection and feed the replay table. A dreamed candidate is also compared with the
    candidate Dream started from, and its dream batch's spot-check state is recorded (``auto_approve``:
    the dream recipe lets it be released without people's review). The candidate is leased while it is
    judged, so retention cannot delete it meanwhile."""
    policy = recipe.policy(rhythm)
    cand = candidates.get(db_path, candidate_id)
    candidate = Path(cand.path)
    with candidates.lease(db_path, cand.candidate_id, f"gate ({rhythm})"):
        try:
            manifest = verify_checkpoint(candidate)
        except CheckpointError as exc:
            raise GateError(f"candidate {cand.short} does not verify, nothing was evaluated: {exc}") from exc
        sha = manifest["checkpoint_sha256"]
        suites = suites or suites_for_candidate(db_path, storage_root, cand, recipe, log=log)
        limit = recipe.examples[rhythm]
        judge = make_judge(recipe.judge)
        live_rel = registry.live(db_path)
        live_ev = None
        if live_rel is not None:
            live_ev = _eval_cached(db_path, f"release:{live_rel.checkpoint_sha256}",
                                   lambda: load_for_eval(Path(live_rel.checkpoint_path)), suites, limit, recipe, judge,
                                   log, f"live release {live_rel.version}", Path(live_rel.checkpoint_path))
        base_ev, base_label = None, "the starting model"
        if recipe.compare_with_base:
            base_ref, load_base, base_label, base_dir = starting_model(db_path, candidate)
            base_ev = _eval_cached(db_path, base_ref, load_base, suites, limit, recipe, judge, log, base_label, base_dir)
        if log:
            log(f"evaluating candidate {cand.short} ({candidate.name}; {rhythm}: {limit} items per suite)")
        model, tok = load_for_eval(candidate)
        cand_ev = evaluate(model, tok, suites, limit=limit, batch_size=recipe.batch_size, log=log, judge=judge,
                           user_tasks=recipe.user_tasks, max_length=recipe.max_context_tokens)
        del model
        cand_ev.cost = serving_cost(candidate, recipe, log, f"candidate {cand.short}")
        verdict = decide(cand_ev, Reference(live=live_ev, base=base_ev, base_label=base_label), policy)
        contaminated, unchecked = frozen_contamination(db_path, cand, suites)
        verdict.risks.extend(unchecked)
        for kind, lines in [*_shopping_failures(db_path, sha, rhythm).items(), *contaminated.items()]:
            if lines:
                getattr(verdict, f"{kind}_failures").extend(lines)
                setattr(verdict, f"{kind}_passed", False)
                verdict.decision = "reject"
        def evaluate_before(before_id: str) -> list[dict]:
            before = candidates.get(db_path, before_id)
            ev = _eval_cached(db_path, f"candidate:{before_id}", lambda: load_for_eval(Path(before.path)), suites,
                              limit, recipe, judge, log, f"the candidate before Dream {before.short}")
            return dream_deltas(cand_ev, ev, policy)

        dream = _dream_facts(db_path, candidate, auto_approve, evaluate_before, log)
        if dream and dream["spot_check"]["blocks_release"]:
            verdict.risks.append(f"release blocked until people review the dream batch: "
                                 f"{dream['spot_check']['blocks_release']}")
        override_reason = _override_reason(db_path, sha)
        if override_reason:
            verdict.risks.append(f"an earlier rejection of this candidate was overridden: {override_reason}")
        now = utcnow()
        report_id = f"gate-{now:%Y%m%d-%H%M%S%f}-{sha[:8]}"
        card_path = Path(storage_root) / "cards" / report_id / CARD
        report = GateReport(report_id, now, rhythm, str(candidate), sha, cand.data_version or "?",
                            suite_version(suites), live_rel.version if live_rel else None, verdict.capability_passed,
                            verdict.safety_passed, verdict.decision, verdict.recommendation,
                            {**verdict.to_json(), "evaluation_seconds": cand_ev.seconds, "examples": cand_ev.examples,
                             "starting_model": base_label if base_ev is not None else None,
                             "frozen_version": frozen_version(suites), "truncated": cand_ev.truncated,
                             "dream": dream,
                             "cost": {label: ev.cost for label, ev in (("this model", cand_ev),
                                                                       (base_label, base_ev),
                                                                       (f"live {live_rel.version}" if live_rel else "", live_ev))
                                      if ev is not None and ev.cost}},
                            str(card_path), None, recipe.recipe_hash())
        with connect(db_path) as con:
            con.execute(SCHEMA)
            con.execute("INSERT INTO gate_reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [report.report_id, now, rhythm, report.candidate_path, sha, report.data_version,
                         report.suite_version, report.live_version, report.capability_passed, report.safety_passed,
                         report.decision, report.recommendation, json.dumps(report.verdict), str(card_path), None,
                         report.recipe_hash])
            candidates.set_status(con, sha, candidates.PASSED if report.passed else candidates.REJECTED, report_id)
        if report.passed:
            decision = "passed the gate — awaiting release"
        else:
            live_txt = f"{live_rel.version} stays live" if live_rel else "nothing is live"
            decision = f"rejected ({'; '.join(failed_checks(report))} check failed); {live_txt}"
            registry.record_rejection(db_path, cand.short, f"{report_id}: " + "; ".join(report.failures)[:2000])
            added = replay.feed(db_path, report_id, failing_items(cand_ev.samples), recipe.replay_max_items,
                                recipe.replay_per_bucket)
            if log:
                for line in report.failures:
                    log(f"gate failure: {line}")
                log(f"gate failed: {sum(added.values())} failing items added to {replay.REPLAY_TABLE} "
                    f"({', '.join(f'{b} {n}' for b, n in sorted(added.items())) or 'none new'})")
        write_card(report, verdict, decision, "candidate")
    return report, verdict, cand_ev


# ------------------------------------------------------------------------------------------ reports
_FIELDS = list(GateReport.__dataclass_fields__)


def _row_to_report(row) -> GateReport:
    d = dict(zip(_FIELDS, row))
    d["verdict"] = json.loads(d["verdict"])
    return GateReport(**d)


def get_report(db_path: Path, report_id: str) -> GateReport:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute(f"SELECT {', '.join(_FIELDS)} FROM gate_reports WHERE report_id = ?", [report_id]).fetchall()
    if not rows:
        raise GateError(f"unknown gate report {report_id!r}")
    return _row_to_report(rows[0])


def latest_report(db_path: Path) -> GateReport | None:
    """The newest report (for the cycle summary printed after a run; stages use report ids)."""
    with connect(db_path) as con:
        con.execute(SCHEMA)
        rows = con.execute(f"SELECT {', '.join(_FIELDS)} FROM gate_reports ORDER BY created_at DESC LIMIT 1").fetchall()
    return _row_to_report(rows[0]) if rows else None


def verdict_of(report: GateReport) -> Verdict:
    from sleep_pipeline.gate.decide import Row

    v = dict(report.verdict)
    rows = [Row(**{k: val for k, val in r.items() if k in Row.__dataclass_fields__}) for r in v.pop("rows")]
    return Verdict(**{k: val for k, val in v.items() if k in Verdict.__dataclass_fields__ and k != "rows"}, rows=rows)


@dataclass(frozen=True)
class ReleaseOutcome:
    release: registry.Release
    report: GateReport
    unchanged: bool  # the candidate's weights are the live release's: nothing new was released
    message: str


def _mark_released(report_id: str, candidate_sha256: str):
    """The release transaction's bookkeeping: the report and the candidate say which release they are."""
    def also(con, version: str) -> None:
        con.execute(SCHEMA)
        con.execute("UPDATE gate_reports SET released_version = ? WHERE report_id = ?", [version, report_id])
        candidates.set_status(con, candidate_sha256, candidates.RELEASED, f"released as {version}")
    return also


def release_gated(db_path: Path, report_id: str, log=None, channel: str = registry.LIVE, cycle_id: str | None = None,
                  cadence: str | None = None) -> ReleaseOutcome:
    """Release the candidate of gate report ``report_id`` if, and only if, that report passed, no gate
    as strict or stricter rejected the same digest (unless overridden), and its files still hash to the
    digest that was evaluated. Raises :class:`GateError` otherwise (``live`` stays). A candidate whose
    weights were released before (the live release, or an earlier one) is a no-op that says so.
    ``channel`` canary moves only the canary pointer (:func:`registry.promote` makes it live later)."""
    report = get_report(db_path, report_id)
    if not report.passed:
        raise GateError(f"gate report {report.report_id} failed ({', '.join(failed_checks(report))}): the candidate is "
                        f"not released; {report.live_version or 'nothing'} stays live. Why: " + "; ".join(report.failures))
    if report.released_version:
        raise GateError(f"gate report {report.report_id} was already released as {report.released_version}")
    blocked = [line for lines in _shopping_failures(db_path, report.candidate_sha256, report.rhythm,
                                                    exclude=report.report_id).values() for line in lines]
    if blocked:
        raise GateError("; ".join(blocked))
    spot = (report.verdict.get("dream") or {}).get("spot_check")
    if spot:  # re-read now: people may have reviewed the batch since the gate ran
        from sleep_pipeline.dream import rater

        why, _ = rater.release_block(db_path, spot["dream_id"], spot["auto_approve"])
        if why:
            raise GateError(f"gate report {report.report_id} passed, but the release waits for people: {why}; "
                            f"{report.live_version or 'nothing'} stays live")
    live = registry.live(db_path)
    same = [r for r in registry.list_releases(db_path) if r.checkpoint_sha256 == report.candidate_sha256]
    if same:
        # the same weights were released before: a new version would only duplicate one (or, if it is
        # not live, silently roll live back to an older model)
        prior = next((r for r in same if live and r.version == live.version), same[-1])
        with connect(db_path) as con:
            con.execute(SCHEMA)
            con.execute("UPDATE gate_reports SET released_version = ? WHERE report_id = ?", [prior.version, report_id])
        if live is not None and prior.version == live.version:
            message = (f"candidate {report.candidate_sha256[:12]} has the same weights as the live release "
                       f"{live.version}: nothing new released")
        else:
            message = (f"candidate {report.candidate_sha256[:12]} has the same weights as the earlier release "
                       f"{prior.version}: nothing new released (live stays {live.version if live else 'empty'}; "
                       f"`sleep-pipeline release rollback {prior.version}` makes it live again)")
        if log:
            log(message)
        report = get_report(db_path, report_id)
        write_card(report, verdict_of(report), f"gated again: the same weights as release {prior.version}; nothing new "
                                               "released", prior.version)
        return ReleaseOutcome(prior, report, True, message)
    try:
        rel = registry.release(db_path, Path(report.candidate_path), report.data_version, report.report_id,
                               rhythm=report.rhythm, expected_sha256=report.candidate_sha256,
                               also=_mark_released(report.report_id, report.candidate_sha256), channel=channel,
                               cycle_id=cycle_id, cadence=cadence)
    except registry.ReleaseError as exc:
        raise GateError(str(exc)) from exc
    report = get_report(db_path, report.report_id)
    where = "" if channel == registry.LIVE else f" to the {channel} channel"
    write_card(report, verdict_of(report), f"released as {rel.version}{where}", rel.version)
    message = f"released {rel.version}{where}: candidate {rel.checkpoint_sha256[:12]} ({rel.checkpoint_path})"
    if log:
        log(message)
    return ReleaseOutcome(rel, report, False, message)


__all__ = ["GateError", "GateReport", "ReleaseOutcome", "run_gate", "release_gated", "latest_report", "get_report",
           "suites_for_mix", "suites_for_candidate", "data_manifest", "failing_items", "write_card", "verdict_of",
           "starting_model", "override", "prior_rejections", "evaluation_key"]
