"""The Gate phase end to end: suites for a data version, evaluate, decide, record, card, release.

The verdict lives in DuckDB (``gate_reports``) together with the candidate's checkpoint digest. The
release step (:func:`release_gated`) trusts nothing else: it re-reads the newest report, checks that
it passed, that it is about the newest candidate, and that the candidate's files still hash to the
digest that was evaluated — so releasing without a gate, or after a failed one, is impossible
whichever way the step is started.

A failed gate keeps ``live`` where it is, records the rejection in the release history, and feeds the
failing items (with their reference answers) to ``hard_example_replay``, which the next data mix draws
from; the next suites then leave those items out, so they stay held out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sleep_pipeline.checkpoint import CARD, CheckpointError, read_manifest, sha256_file, verify_checkpoint
from sleep_pipeline.config import stable_hash
from sleep_pipeline.data.mix import REPLAY_TABLE
from sleep_pipeline.fsio import write_atomic
from sleep_pipeline.gate import model_card
from sleep_pipeline.gate.decide import GateRecipe, Verdict, decide, failed_checks
from sleep_pipeline.gate.evaluate import Evaluation, evaluate, load_for_eval
from sleep_pipeline.gate.judge import judge_spec
from sleep_pipeline.gate.suites import PERPLEXITY, TASK_BY_NAME, build_suites, prompt_key, suite_version
from sleep_pipeline.release import registry
from sleep_pipeline.store import connect, insert_rows, utcnow

SCHEMA = f"""
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
CREATE TABLE IF NOT EXISTS {REPLAY_TABLE} (
    example_id VARCHAR, bucket VARCHAR, system VARCHAR, prompt VARCHAR, response VARCHAR, meta VARCHAR,
    report_id VARCHAR, added_at TIMESTAMP
);
"""
REPLAY_COLUMNS = ("example_id", "bucket", "system", "prompt", "response", "meta", "report_id", "added_at")


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


# -------------------------------------------------------------------------------------- evaluation
def _cached(db_path: Path, key: str) -> Evaluation | None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        row = con.execute("SELECT evaluation FROM gate_evaluations WHERE cache_key = ?", [key]).fetchone()
    return Evaluation.from_json(json.loads(row[0])) if row else None


def _store_eval(db_path: Path, key: str, model_ref: str, suites: str, ev: Evaluation) -> None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        con.execute("DELETE FROM gate_evaluations WHERE cache_key = ?", [key])
        con.execute("INSERT INTO gate_evaluations VALUES (?, ?, ?, ?, ?)",
                    [key, model_ref, suites, utcnow(), json.dumps(ev.to_json())])


def starting_model(candidate: Path):
    """The model the candidate was trained from, untrained: the base model directory it names, or
    the same architecture freshly initialised with the Learn recipe's seed. Returns (cache ref,
    loader); the model is only built when the loader is called (not on a cached evaluation)."""
    from transformers import AutoConfig

    manifest = read_manifest(candidate)
    base = manifest.get("base_model")
    if base and base != "built from config" and Path(base).is_dir():
        return f"base:{base}", lambda: load_for_eval(Path(base))
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

    return ref, load


def _eval_cached(db_path, ref: str, load, suites: Path, limit: int, recipe: GateRecipe, log, label: str) -> Evaluation:
    key = stable_hash({"model": ref, "suites": suite_version(suites), "limit": limit, "judge": recipe.judge})
    ev = _cached(db_path, key)
    if ev is not None:
        if log:
            log(f"{label}: reusing the stored evaluation of {ref[:40]} on {suite_version(suites)}")
        return ev
    model, tok = load()
    if log:
        log(f"evaluating {label} ({ref[:40]})")
    ev = evaluate(model, tok, suites, limit=limit, batch_size=recipe.batch_size, log=log,
                  judge_spec=judge_spec(**recipe.judge), keep_samples=False)
    _store_eval(db_path, key, ref, suite_version(suites), ev)
    return ev


# --------------------------------------------------------------------------------------------- gate
def _failing(samples: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """(task, sample) for every item the candidate got wrong, judged on its task's headline metric."""
    out = []
    for task, rows in samples.items():
        spec = TASK_BY_NAME[task]
        if spec.kind == PERPLEXITY or spec.name == "sp_robustness":
            continue
        h = spec.headline
        for s in rows:
            v = s["metrics"].get(h.name)
            if v is None:
                continue
            bad = (v < 1.0) if h.higher_is_better else (v > 0.0)
            if bad and s["doc"].get("target"):
                out.append((task, s))
    return out


def feed_replay(db_path: Path, report_id: str, samples: dict[str, list[dict]], max_items: int) -> int:
    """Failing items (prompt + reference answer) into the hard-example replay table; returns how many
    new ones went in (an item already there is not added twice)."""
    failing = _failing(samples)
    rows = []
    for task, s in failing[:max_items] if max_items else []:
        d = s["doc"]
        rows.append({"example_id": d["id"], "bucket": d["bucket"], "system": d.get("system") or "",
                     "prompt": d["prompt"], "response": d["target"],
                     "meta": json.dumps({"suite": task, "failed_with": str(s["response"])[:500]}),
                     "report_id": report_id, "added_at": utcnow()})
    with connect(db_path) as con:
        con.execute(SCHEMA)
        known = {r[0] for r in con.execute(f"SELECT example_id FROM {REPLAY_TABLE}").fetchall()}
        fresh = [r for r in rows if r["example_id"] not in known]
        insert_rows(con, REPLAY_TABLE, REPLAY_COLUMNS, fresh)
    return len(fresh)


def _card_facts(report: GateReport, verdict: Verdict, manifest: dict, decision: str, version: str) -> model_card.CardFacts:
    rows = [model_card.MetricRow(r.task, r.metric, r.value, r.stderr, r.threshold, r.higher_is_better, r.live,
                                 r.passed, base=r.base, base_stderr=r.base_stderr, kind=r.kind)
            for r in (verdict.rows if isinstance(verdict, Verdict) else [])]
    lineage = {
        "candidate checkpoint": report.candidate_path,
        "checkpoint sha256": report.candidate_sha256,
        "trained from": manifest.get("base_model", "?"),
        "Learn recipe hash": manifest.get("recipe_hash", "?"),
        "gate recipe hash": report.recipe_hash,
        "evaluation suites": report.suite_version,
        "gate report": report.report_id,
        "rhythm": report.rhythm,
        "compared with release": report.live_version or "none (first release)",
        "training": f"{manifest.get('steps', '?')} steps, {manifest.get('tokens', '?')} tokens, "
                    f"validation loss {manifest.get('initial_validation_loss')} -> {manifest.get('validation_loss')}",
    }
    risks = list(verdict.failures) + list(verdict.risks)
    return model_card.CardFacts(
        name="sleep-pipeline-model", version=version, decision=decision,
        base_model=manifest.get("base_model", "built from config"), data_version=report.data_version,
        datasets=[f"sleep-pipeline/{report.data_version}"], lineage=lineage, metrics=rows, risks=risks,
        recommendation=verdict.recommendation,
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


def run_gate(db_path: Path, storage_root: Path, candidate: Path, suites: Path, recipe: GateRecipe, rhythm: str,
             log=None) -> tuple[GateReport, Verdict, Evaluation]:
    """Evaluate ``candidate`` (and the live release, and the untrained starting model), decide, store
    the report, write the card; on a failed gate record the rejection and feed the replay table."""
    candidate = Path(candidate).resolve()
    try:
        manifest = verify_checkpoint(candidate)
    except CheckpointError as exc:
        raise GateError(f"the candidate does not verify, nothing was evaluated: {exc}") from exc
    sha = manifest["checkpoint_sha256"]
    limit = recipe.examples[rhythm]
    live_rel = registry.live(db_path)
    live_ev = None
    if live_rel is not None:
        live_ev = _eval_cached(db_path, f"release:{live_rel.checkpoint_sha256}", lambda: load_for_eval(Path(live_rel.checkpoint_path)),
                               suites, limit, recipe, log, f"live release {live_rel.version}")
    base_ev = None
    if recipe.compare_with_base:
        base_ref, load_base = starting_model(candidate)
        base_ev = _eval_cached(db_path, base_ref, load_base, suites, limit, recipe, log, "untrained starting model")
    if log:
        log(f"evaluating candidate {candidate.name} ({rhythm}: {limit} items per suite)")
    model, tok = load_for_eval(candidate)
    cand_ev = evaluate(model, tok, suites, limit=limit, batch_size=recipe.batch_size, log=log,
                       judge_spec=judge_spec(**recipe.judge))
    verdict = decide(cand_ev, live_ev, recipe, rhythm, base=base_ev)
    now = utcnow()
    report_id = f"gate-{now:%Y%m%d-%H%M%S}-{sha[:8]}"
    card_path = Path(storage_root) / "cards" / report_id / CARD
    report = GateReport(report_id, now, rhythm, str(candidate), sha, manifest.get("data_version", "?"),
                        suite_version(suites), live_rel.version if live_rel else None, verdict.capability_passed,
                        verdict.safety_passed, verdict.decision, verdict.recommendation,
                        {**verdict.to_json(), "evaluation_seconds": cand_ev.seconds, "examples": cand_ev.examples},
                        str(card_path), None, recipe.recipe_hash())
    with connect(db_path) as con:
        con.execute(SCHEMA)
        con.execute("INSERT INTO gate_reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [report.report_id, now, rhythm, report.candidate_path, sha, report.data_version,
                     report.suite_version, report.live_version, verdict.capability_passed, verdict.safety_passed,
                     verdict.decision, verdict.recommendation, json.dumps(report.verdict), str(card_path), None,
                     report.recipe_hash])
    if verdict.passed:
        decision = "passed the gate — awaiting release"
    else:
        live_txt = f"{live_rel.version} stays live" if live_rel else "nothing is live"
        decision = f"rejected ({'; '.join(failed_checks(verdict))} check failed); {live_txt}"
        registry.record_rejection(db_path, candidate.name, f"{report_id}: " + "; ".join(verdict.failures)[:2000])
        added = feed_replay(db_path, report_id, cand_ev.samples, recipe.replay_max_items)
        if log:
            log(f"gate failed: {added} failing items added to {REPLAY_TABLE}")
    write_card(report, verdict, decision, "candidate")
    return report, verdict, cand_ev


# ------------------------------------------------------------------------------------------ reports
_FIELDS = list(GateReport.__dataclass_fields__)


def _row_to_report(row) -> GateReport:
    d = dict(zip(_FIELDS, row))
    d["verdict"] = json.loads(d["verdict"])
    return GateReport(**d)


def latest_report(db_path: Path) -> GateReport | None:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        row = con.execute(f"SELECT {', '.join(_FIELDS)} FROM gate_reports ORDER BY created_at DESC LIMIT 1").fetchone()
    return _row_to_report(row) if row else None


def get_report(db_path: Path, report_id: str) -> GateReport:
    with connect(db_path) as con:
        con.execute(SCHEMA)
        row = con.execute(f"SELECT {', '.join(_FIELDS)} FROM gate_reports WHERE report_id = ?", [report_id]).fetchone()
    if row is None:
        raise GateError(f"unknown gate report {report_id!r}")
    return _row_to_report(row)


def verdict_of(report: GateReport) -> Verdict:
    from sleep_pipeline.gate.decide import Row

    v = dict(report.verdict)
    rows = [Row(**{k: val for k, val in r.items() if k in Row.__dataclass_fields__}) for r in v.pop("rows")]
    return Verdict(**{k: val for k, val in v.items() if k in Verdict.__dataclass_fields__ and k != "rows"}, rows=rows)


def release_gated(db_path: Path, newest_candidate: Path | None, log=None) -> tuple[registry.Release, GateReport]:
    """Release the newest candidate if, and only if, its stored gate verdict passed and its files
    still hash to the digest that was evaluated. Raises :class:`GateError` otherwise (``live`` stays)."""
    report = latest_report(db_path)
    if report is None:
        raise GateError("no gate report: the candidate has not been through the gate (materialise gate_report first)")
    if newest_candidate is not None and Path(newest_candidate).resolve() != Path(report.candidate_path).resolve():
        raise GateError(f"the newest candidate {newest_candidate} has not been gated "
                        f"(the newest gate report {report.report_id} is about {report.candidate_path})")
    if not report.passed:
        raise GateError(f"gate report {report.report_id} failed ({', '.join(failed_checks(report))}): the candidate is "
                        f"not released; {report.live_version or 'nothing'} stays live. Why: " + "; ".join(report.failures))
    if report.released_version:
        raise GateError(f"gate report {report.report_id} was already released as {report.released_version}")
    try:
        rel = registry.release(db_path, Path(report.candidate_path), report.data_version, report.report_id,
                               rhythm=report.rhythm, expected_sha256=report.candidate_sha256)
    except registry.ReleaseError as exc:
        raise GateError(str(exc)) from exc
    with connect(db_path) as con:
        con.execute(SCHEMA)
        con.execute("UPDATE gate_reports SET released_version = ? WHERE report_id = ?", [rel.version, report.report_id])
    report = get_report(db_path, report.report_id)
    write_card(report, verdict_of(report), f"released as {rel.version}", rel.version)
    if log:
        log(f"released {rel.version}: {rel.checkpoint_path}")
    return rel, report


__all__ = ["GateError", "GateReport", "run_gate", "release_gated", "latest_report", "get_report", "suites_for_mix",
           "feed_replay", "write_card", "verdict_of", "starting_model"]
