"""Gate phase: ``gate_suites`` → ``gate_report`` (capability and safety checks) → ``gated_release``."""

import json

import dagster as dg

from resources.storage import GateRecipeResource, StorageResource
from sleep_pipeline.checkpoint import latest_checkpoint
from sleep_pipeline.data.mix import latest_manifest
from sleep_pipeline.gate import run as gate
from sleep_pipeline.gate.decide import RHYTHMS
from sleep_pipeline.gate.model_card import bound_text, fmt
from sleep_pipeline.gate.suites import GROUP, MANIFEST, TASK_BY_NAME

GATE_GROUP = "gate"
RELEASE_POOL = "sleep_pipeline_release"


class GateConfig(dg.Config):
    rhythm: str = "weekly"  # nightly (quick) | weekly | monthly (full): picks the thresholds and suite size


@dg.asset(
    group_name=GATE_GROUP,
    deps=["tiered_data_mix"],
    kinds={"lm_eval", "json"},
    description="The gate's evaluation suites as lm-eval task definitions over local JSONL, generated offline, "
                "held out from the current data mix (any item seen in training is dropped and replaced).",
)
def gate_suites(context: dg.AssetExecutionContext, storage: StorageResource,
                gate_recipe: GateRecipeResource) -> dg.MaterializeResult:
    recipe = gate_recipe.load()
    manifest = latest_manifest(storage.db_path)
    if not manifest:
        raise RuntimeError("no data version: materialise tiered_data_mix first")
    suites = gate.suites_for_mix(storage.root, manifest, recipe, log=context.log.info)
    info = json.loads((suites / MANIFEST).read_text())
    table = "\n".join(f"| {t} | {TASK_BY_NAME[t].kind} | {n} | {info['dropped'][t]} | {TASK_BY_NAME[t].description} |"
                      for t, n in info["counts"].items())
    return dg.MaterializeResult(metadata={
        "suite_version": info["version"],
        "path": dg.MetadataValue.path(str(suites)),
        "items": sum(info["counts"].values()),
        "dropped_as_seen_in_training": sum(info["dropped"].values()),
        "tasks": dg.MetadataValue.md("| task | check | items | dropped | measures |\n|---|---|---|---|---|\n" + table),
        "run_with_lm_eval": dg.MetadataValue.md(
            f"```\nlm_eval run --model hf --model_args pretrained=CHECKPOINT --include_path {suites} "
            f"--tasks {GROUP} --apply_chat_template\n```"),
        "data_version": manifest["version_id"],
    })


def _bullets(items) -> str:
    return "\n".join(f"- {x}" for x in items) or "none"


def _metrics_md(verdict: dict) -> str:
    lines = ["| check | task | metric | value | ± stderr | threshold | live | delta | untrained | pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in verdict["rows"]:
        bound = bound_text(r["threshold"], r["higher_is_better"])
        ok = "—" if r["passed"] is None else ("yes" if r["passed"] else "**no**")
        lines.append(f"| {r['kind']} | {r['task']} | {r['metric']} | {fmt(r['value'])} | {fmt(r['stderr'])} | {bound} | "
                     f"{fmt(r['live'])} | {fmt(r['delta'], signed=True)} | {fmt(r['base'])} | {ok} |")
    return "\n".join(lines)


def _forgetting_md(verdict: dict) -> str:
    """The verdict's forgetting monitor: per bucket, the headline metric vs the live release."""
    rows = verdict.get("forgetting") or []
    if not rows:
        return "no live release to compare with"
    lines = ["| bucket | metric | live | candidate | delta | noise interval | status |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "**fail**" if r["status"] == "fail" else r["status"]
        lines.append(f"| {r['bucket']} | {r['task']}/{r['metric']} | {r['live']:.3f} | {r['value']:.3f} | "
                     f"{r['delta']:+.3f} | ±{r['noise']:.3f} | {status} |")
    return "\n".join(lines)


@dg.asset(
    group_name=GATE_GROUP,
    deps=["trained_checkpoint", "gate_suites"],
    kinds={"lm_eval", "duckdb"},
    description="Evaluate the newest candidate (plus the live release and the untrained starting model) on the "
                "gate suites through lm-eval; every metric with its standard error, threshold and delta; the "
                "verdict and a model card are stored. A failed gate records the rejection and feeds hard examples "
                "to the replay table.",
)
def gate_report(context: dg.AssetExecutionContext, config: GateConfig, storage: StorageResource,
                gate_recipe: GateRecipeResource) -> dg.MaterializeResult:
    if config.rhythm not in RHYTHMS:
        raise dg.Failure(f"rhythm must be one of {RHYTHMS}, got {config.rhythm!r}")
    recipe = gate_recipe.load()
    candidate = latest_checkpoint(storage.learn_checkpoints)
    if candidate is None:
        raise dg.Failure("no candidate checkpoint: materialise trained_checkpoint first")
    manifest = latest_manifest(storage.db_path)
    suites = gate.suites_for_mix(storage.root, manifest, recipe)
    report, verdict, ev = gate.run_gate(storage.db_path, storage.root, candidate, suites, recipe, config.rhythm,
                                        log=context.log.info)
    context.log.info(f"gate {report.report_id}: capability {'passed' if verdict.capability_passed else 'FAILED'}, "
                     f"safety {'passed' if verdict.safety_passed else 'FAILED'} -> {verdict.decision}")
    return dg.MaterializeResult(metadata={
        "report_id": report.report_id,
        "decision": verdict.decision,
        "recommendation": verdict.recommendation,
        "capability_passed": verdict.capability_passed,
        "safety_passed": verdict.safety_passed,
        "rhythm": config.rhythm,
        "candidate": dg.MetadataValue.path(report.candidate_path),
        "candidate_sha256": report.candidate_sha256,
        "live_release": report.live_version or "none",
        "metrics": dg.MetadataValue.md(_metrics_md(report.verdict)),
        "forgetting": dg.MetadataValue.md(_forgetting_md(report.verdict)),
        "failures": dg.MetadataValue.md(_bullets(verdict.failures)),
        "risks": dg.MetadataValue.md(_bullets(verdict.risks)),
        "model_card": dg.MetadataValue.md(open(report.card_path, encoding="utf-8").read()),
        "model_card_path": dg.MetadataValue.path(report.card_path),
        "eval_examples": ev.examples,
        "eval_examples_per_s": round(ev.examples / max(ev.seconds, 1e-9), 1),
    })


def _check(kind: str):
    passed_attr = f"{kind}_passed"

    @dg.asset_check(asset=gate_report, name=f"{kind}_gate", blocking=True,
                    description=f"The stored verdict's {kind} thresholds (and, for safety, no regression beyond noise) hold.")
    def check(storage: StorageResource) -> dg.AssetCheckResult:
        report = gate.latest_report(storage.db_path)
        if report is None:
            return dg.AssetCheckResult(passed=False, metadata={"why": "no gate report"})
        failures = report.verdict.get(f"{kind}_failures", [])
        return dg.AssetCheckResult(
            passed=bool(getattr(report, passed_attr)),
            metadata={"report_id": report.report_id, "failures": dg.MetadataValue.md(_bullets(failures))},
        )

    return check


capability_gate = _check("capability")
safety_gate = _check("safety")


@dg.asset(
    group_name=GATE_GROUP,
    deps=["gate_report"],
    pool=RELEASE_POOL,
    kinds={"duckdb"},
    description="Release the gated candidate: re-reads the stored verdict and the candidate's sha256 (never "
                "trusts the run that got here), then moves the live pointer in one transaction.",
)
def gated_release(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    try:
        rel, report = gate.release_gated(storage.db_path, latest_checkpoint(storage.learn_checkpoints), log=context.log.info)
    except gate.GateError as exc:
        raise dg.Failure(str(exc)) from exc
    return dg.MaterializeResult(metadata={
        "version": rel.version,
        "checkpoint": dg.MetadataValue.path(rel.checkpoint_path),
        "checkpoint_sha256": rel.checkpoint_sha256,
        "gate_report": report.report_id,
        "data_version": rel.data_version,
        "model_card": dg.MetadataValue.md(open(report.card_path, encoding="utf-8").read()),
        "model_card_path": dg.MetadataValue.path(report.card_path),
    })
