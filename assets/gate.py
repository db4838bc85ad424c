"""Gate phase: ``gate_suites`` → ``gate_report`` (capability and safety checks) → ``gated_release``.

Each stage uses the id its upstream materialisation recorded: the data version of ``tiered_data_mix``,
the candidate of ``trained_checkpoint``, the report of ``gate_report``.
"""

import json

import dagster as dg

from assets.lineage import recorded
from resources.storage import DreamRecipeResource, GateRecipeResource, StorageResource
from sleep_pipeline.gate import render
from sleep_pipeline.gate import run as gate
from sleep_pipeline.gate.decide import RHYTHMS
from sleep_pipeline.gate.suites import GROUP, MANIFEST

GATE_GROUP = "gate"
RELEASE_POOL = "sleep_pipeline_release"


class GateConfig(dg.Config):
    rhythm: str = "weekly"  # nightly (quick) | weekly | monthly (full): picks the thresholds and suite size


@dg.asset(
    group_name=GATE_GROUP,
    deps=["tiered_data_mix"],
    kinds={"lm_eval", "json"},
    description="The gate's evaluation suites as lm-eval task definitions over local JSONL, generated offline: "
                "suites held out from the data version tiered_data_mix recorded (any item seen in training is dropped "
                "and replaced), and the frozen held-out suites (ho_*: requests, harm categories, jailbreak templates, "
                "tools and difficulties no training data has), identical in every cycle.",
)
def gate_suites(context: dg.AssetExecutionContext, storage: StorageResource,
                gate_recipe: GateRecipeResource) -> dg.MaterializeResult:
    data_version = recorded(context, "tiered_data_mix", "version_id")
    manifest = gate.data_manifest(storage.db_path, data_version)
    suites = gate.suites_for_mix(storage.root, manifest, gate_recipe.load(), log=context.log.info)
    info = json.loads((suites / MANIFEST).read_text())
    return dg.MaterializeResult(metadata={
        "suite_version": info["version"],
        "frozen_suite_version": info.get("frozen_version", "?"),
        "path": dg.MetadataValue.path(str(suites)),
        "items": sum(info["counts"].values()),
        "dropped_as_seen_in_training": sum(info["dropped"].values()),
        "tasks": dg.MetadataValue.md(render.suites_table(info)),
        "run_with_lm_eval": dg.MetadataValue.md(
            f"```\nlm_eval run --model hf --model_args pretrained=CHECKPOINT --include_path {suites} "
            f"--tasks {GROUP} --apply_chat_template\n```"),
        "data_version": data_version,
    })


@dg.asset(
    group_name=GATE_GROUP,
    deps=["dreamed_checkpoint", "gate_suites"],
    kinds={"lm_eval", "duckdb"},
    description="Evaluate the candidate dreamed_checkpoint recorded (plus the live release, the model its cycle started "
                "from and, for a dreamed candidate, the candidate before Dream) on suites held out from its own data "
                "version, through lm-eval; every metric with its standard error, threshold and delta; the verdict, the "
                "dream batch's spot-check state and a model card are stored. A failed gate records the rejection and "
                "feeds hard examples to the replay table.",
)
def gate_report(context: dg.AssetExecutionContext, config: GateConfig, storage: StorageResource,
                gate_recipe: GateRecipeResource, dream_recipe: DreamRecipeResource) -> dg.MaterializeResult:
    if config.rhythm not in RHYTHMS:
        raise dg.Failure(f"rhythm must be one of {RHYTHMS}, got {config.rhythm!r}")
    candidate_id = recorded(context, "dreamed_checkpoint", "candidate_id")
    report, verdict, ev = gate.run_gate(storage.db_path, storage.root, candidate_id, gate_recipe.load(),
                                        config.rhythm, log=context.log.info,
                                        auto_approve=dream_recipe.load().auto_approve)
    context.log.info(f"gate {report.report_id}: capability {'passed' if verdict.capability_passed else 'FAILED'}, "
                     f"safety {'passed' if verdict.safety_passed else 'FAILED'} -> {verdict.decision}")
    with open(report.card_path, encoding="utf-8") as fh:
        card = fh.read()
    return dg.MaterializeResult(metadata={
        "report_id": report.report_id,
        "candidate_id": report.candidate_id,
        "decision": verdict.decision,
        "recommendation": verdict.recommendation,
        "capability_passed": verdict.capability_passed,
        "safety_passed": verdict.safety_passed,
        "rhythm": config.rhythm,
        "candidate": dg.MetadataValue.path(report.candidate_path),
        "data_version": report.data_version,
        "suite_version": report.suite_version,
        "frozen_suite_version": report.verdict.get("frozen_version") or "?",
        "prompts_truncated_to_context": sum((report.verdict.get("truncated") or {}).values()),
        "cost_to_serve": dg.MetadataValue.json(report.verdict.get("cost") or {}),
        "live_release": report.live_version or "none",
        "dream_spot_check": ((report.verdict.get("dream") or {}).get("spot_check") or {}).get("status",
                                                                                           "not a dreamed candidate"),
        "metrics": dg.MetadataValue.md(render.metrics_table(report.verdict)),
        "forgetting": dg.MetadataValue.md(render.forgetting_table(report.verdict)),
        "failures": dg.MetadataValue.md(render.bullets(verdict.failures)),
        "risks": dg.MetadataValue.md(render.bullets(verdict.risks)),
        "model_card": dg.MetadataValue.md(card),
        "model_card_path": dg.MetadataValue.path(report.card_path),
        "eval_examples": ev.examples,
        "eval_examples_per_s": round(ev.examples / max(ev.seconds, 1e-9), 1),
    })


def _check(kind: str):
    passed_attr = f"{kind}_passed"

    @dg.asset_check(asset=gate_report, name=f"{kind}_gate", blocking=True,
                    description=f"The stored verdict's {kind} thresholds (and, for safety, no regression beyond noise) "
                                "hold for the report gate_report recorded.")
    def check(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        report = gate.get_report(storage.db_path, recorded(context, "gate_report", "report_id"))
        failures = report.verdict.get(f"{kind}_failures", [])
        return dg.AssetCheckResult(
            passed=bool(getattr(report, passed_attr)),
            metadata={"report_id": report.report_id, "candidate_id": report.candidate_id,
                      "failures": dg.MetadataValue.md(render.bullets(failures))},
        )

    return check


capability_gate = _check("capability")
safety_gate = _check("safety")


@dg.asset(
    group_name=GATE_GROUP,
    deps=["gate_report"],
    pool=RELEASE_POOL,
    kinds={"duckdb"},
    description="Release the candidate of the report gate_report recorded: re-reads the stored verdict, refuses a "
                "candidate an as-strict gate rejected, re-checks the candidate's sha256, then moves the live pointer "
                "and marks report and candidate released in one transaction.",
)
def gated_release(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    try:
        out = gate.release_gated(storage.db_path, recorded(context, "gate_report", "report_id"), log=context.log.info)
    except gate.GateError as exc:
        raise dg.Failure(str(exc)) from exc
    rel, report = out.release, out.report
    with open(report.card_path, encoding="utf-8") as fh:
        card = fh.read()
    return dg.MaterializeResult(metadata={
        "version": rel.version,
        "unchanged": out.unchanged,
        "outcome": out.message,
        "candidate_id": rel.checkpoint_sha256,
        "checkpoint": dg.MetadataValue.path(rel.checkpoint_path),
        "gate_report": report.report_id,
        "data_version": rel.data_version,
        "model_card": dg.MetadataValue.md(card),
        "model_card_path": dg.MetadataValue.path(report.card_path),
    })
