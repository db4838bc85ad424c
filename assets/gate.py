"""Gate phase: ``gate_suites`` → ``gate_report`` (capability and safety checks) → ``gated_release``.

Each stage uses the id its upstream materialisation recorded: the data version of ``tiered_data_mix``,
the candidate of ``trained_checkpoint``, the report of ``gate_report``.
"""

import json
from typing import Optional

import dagster as dg

from assets.lineage import cycle_metadata, cycle_of, recorded, rhythm_of
from assets.policies import IO_RETRY, permanent
from resources.storage import DreamRecipeResource, GateRecipeResource, RhythmsResource, StorageResource
from sleep_pipeline import candidates
from sleep_pipeline.gate import model_card, render
from sleep_pipeline.gate import run as gate
from sleep_pipeline.gate.decide import RHYTHMS
from sleep_pipeline.gate.suites import GROUP, MANIFEST
from sleep_pipeline.release import registry
from sleep_pipeline.rhythms import DECISION_TAG

GATE_GROUP = "gate"
RELEASE_POOL = "sleep_pipeline_release"


class GateConfig(dg.Config):
    # nightly (quick) | weekly | monthly (full): picks the thresholds and suite size; default: the gate of
    # the run's rhythm (rhythms.yaml), else weekly
    rhythm: Optional[str] = None


@dg.asset(
    group_name=GATE_GROUP,
    deps=["tiered_data_mix"],
    kinds={"lm_eval", "json"},
    retry_policy=IO_RETRY,
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
        **cycle_metadata(context),
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
                gate_recipe: GateRecipeResource, dream_recipe: DreamRecipeResource,
                rhythms: RhythmsResource) -> dg.MaterializeResult:
    rhythm = rhythms.of(rhythm_of(context))
    gate_rhythm = config.rhythm or (rhythm.gate if rhythm else "weekly")
    if gate_rhythm not in RHYTHMS:
        raise dg.Failure(f"rhythm must be one of {RHYTHMS}, got {gate_rhythm!r}")
    candidate_id = recorded(context, "dreamed_checkpoint", "candidate_id")
    report, verdict, ev = gate.run_gate(storage.db_path, storage.root, candidate_id, gate_recipe.load(),
                                        gate_rhythm, log=context.log.info,
                                        auto_approve=dream_recipe.load(rhythm).auto_approve)
    context.log.info(f"gate {report.report_id}: capability {'passed' if verdict.capability_passed else 'FAILED'}, "
                     f"safety {'passed' if verdict.safety_passed else 'FAILED'} -> {verdict.decision}")
    # a rejection is an outcome, not a failure of the run: the run list tells the two apart by this tag
    context.instance.add_run_tags(context.run.run_id, {DECISION_TAG: "passed" if report.passed else "rejected"})
    with open(report.card_path, encoding="utf-8") as fh:
        card = fh.read()
    return dg.MaterializeResult(metadata={
        "report_id": report.report_id,
        "candidate_id": report.candidate_id,
        "decision": verdict.decision,
        "recommendation": verdict.recommendation,
        "capability_passed": verdict.capability_passed,
        "safety_passed": verdict.safety_passed,
        "gate_rhythm": gate_rhythm,
        **cycle_metadata(context),
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
        "model_card": dg.MetadataValue.md(model_card.for_display(card)),
        "model_card_path": dg.MetadataValue.path(report.card_path),
        "eval_examples": ev.examples,
        "eval_examples_per_s": round(ev.examples / max(ev.seconds, 1e-9), 1),
    })


def _check(kind: str):
    passed_attr = f"{kind}_passed"

    # not blocking: a rejection shows here (red) and in gate_report's metadata and the run's tag, and the
    # run still succeeds -- gated_release re-reads the stored verdict and never releases a rejected candidate
    @dg.asset_check(asset=gate_report, name=f"{kind}_gate", blocking=False,
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


class ReleaseConfig(dg.Config):
    channel: Optional[str] = None  # live | canary; default: the run's rhythm's release_to (rhythms.yaml), else live


@dg.asset(
    group_name=GATE_GROUP,
    deps=["gate_report"],
    pool=RELEASE_POOL,
    kinds={"duckdb"},
    retry_policy=IO_RETRY,
    output_required=False,
    description="Release the candidate of the report gate_report recorded into the live or canary channel: re-reads "
                "the stored verdict, refuses a candidate an as-strict gate rejected, re-checks the candidate's sha256, "
                "then moves the channel's pointer and marks report and candidate released in one transaction. A "
                "rejected candidate is not materialised and the run still succeeds (tag sleep_pipeline/decision="
                "rejected); under a rhythm with rollback_on_alarm, live goes back one release if it has an open "
                "regression alarm.",
)
def gated_release(context: dg.AssetExecutionContext, config: ReleaseConfig, storage: StorageResource,
                  rhythms: RhythmsResource):
    rhythm = rhythms.of(rhythm_of(context))
    channel = config.channel or (rhythm.release_to if rhythm else registry.LIVE)
    if channel not in registry.CHANNELS:
        raise permanent(f"channel must be one of {registry.CHANNELS}, got {channel!r}")
    report = gate.get_report(storage.db_path, recorded(context, "gate_report", "report_id"))
    if not report.passed:
        context.instance.add_run_tags(context.run.run_id, {DECISION_TAG: "rejected"})
        live = registry.live(storage.db_path)
        context.log.warning(f"gate report {report.report_id} rejected candidate {report.candidate_id[:12]} "
                            f"({', '.join(gate.failed_checks(report))}): nothing released; "
                            f"{live.version if live else 'nothing'} stays live")
        alarms = registry.open_alarms(storage.db_path, live.version) if live else []
        if rhythm and rhythm.rollback_on_alarm and alarms:
            try:
                back = registry.rollback(storage.db_path, reason=f"{rhythm.name} rhythm: candidate rejected by "
                                         f"{report.report_id} while {live.version} has an open alarm "
                                         f"({alarms[0]['reason']})")
            except registry.ReleaseError as exc:
                context.log.warning(f"{live.version} has an open regression alarm, but live cannot roll back: {exc}")
            else:
                context.log.warning(f"live rolled back {live.version} -> {back.version} (open regression alarm)")
                context.instance.add_run_tags(context.run.run_id, {DECISION_TAG: f"rejected, rolled back to {back.version}"})
        return
    try:
        out = gate.release_gated(storage.db_path, report.report_id, log=context.log.info, channel=channel,
                                 cycle_id=cycle_of(context), cadence=rhythm.name if rhythm else None)
    except gate.GateError as exc:
        raise permanent(str(exc)) from exc
    rel, report = out.release, out.report
    with open(report.card_path, encoding="utf-8") as fh:
        card = fh.read()
    yield dg.MaterializeResult(metadata={
        "version": rel.version,
        "channel": channel,
        "unchanged": out.unchanged,
        "outcome": out.message,
        "candidate_id": rel.checkpoint_sha256,
        "checkpoint": dg.MetadataValue.path(rel.checkpoint_path),
        "gate_report": report.report_id,
        "data_version": rel.data_version,
        **cycle_metadata(context),
        "lineage": dg.MetadataValue.md(" ← ".join(f"{c.phase} `{c.short}`" for c in
                                                  candidates.ancestors(storage.db_path, rel.checkpoint_sha256))),
        "model_card": dg.MetadataValue.md(model_card.for_display(card)),
        "model_card_path": dg.MetadataValue.path(report.card_path),
    })
