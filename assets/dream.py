"""Dream phase: ``red_team_library`` (self-play attacks on the candidate, coverage and success rates),
``dream_set`` (synthetic items behind the quality gate, a sample queued for people to spot-check) and
``dreamed_checkpoint`` (the candidate fine-tuned on blend(dpo pairs, synthetic, sft replay) on the
DeepSpeed resource), which the Gate judges.

All three start from the candidate ``compressed_checkpoint`` selected -- or, in a rhythm whose
``dream_from`` is ``live`` (the daily one), from the live release, with that rhythm's dream recipe.
"""

from typing import Literal

import dagster as dg

from assets.lineage import cycle_metadata, recorded, rhythm_of
from resources.deepspeed import DeepSpeedClusterResource, reported_checkpoint
from resources.storage import (CompressRecipeResource, DreamRecipeResource, GateRecipeResource, RhythmsResource,
                               StorageResource)
from sleep_pipeline import candidates
from sleep_pipeline.release import registry
from sleep_pipeline.dream import finetune, redteam
from sleep_pipeline.dream import run as dream_run
from sleep_pipeline.plots import loss_curve_markdown
from sleep_pipeline.train import learn
from sleep_pipeline.train.runtime import read_metrics

DREAM_GROUP = "dream"


def dream_start(context, storage: StorageResource, rhythms: RhythmsResource, dream_recipe: DreamRecipeResource):
    """(the candidate id Dream starts from, the dream recipe) for this run's rhythm."""
    rhythm = rhythms.of(rhythm_of(context))
    if rhythm is not None and rhythm.dream_from == "live":
        live = registry.live(storage.db_path)
        if live is None:
            raise dg.Failure(f"the {rhythm.name} rhythm dreams from the live release, and nothing is live yet: "
                             "release a candidate first (a weekly or monthly cycle, or the sleep_cycle job)")
        return live.checkpoint_sha256, dream_recipe.load(rhythm)
    return recorded(context, "compressed_checkpoint", "candidate_id"), dream_recipe.load(rhythm)


class DreamConfig(dg.Config):
    force: bool = False  # dream again even when this recipe already dreamed on this candidate


@dg.asset(
    group_name=DREAM_GROUP,
    deps=["compressed_checkpoint"],
    kinds={"pytorch", "duckdb"},
    description="The red-team library: every transform attacks every harm category of the training data against the "
                "candidate compressed_checkpoint selected; attempts accumulate in DuckDB (red_team_library) with the "
                "dream sets' self-play attacks and people's curated entries (`sleep-pipeline redteam add`). Metadata: "
                "coverage per harm category x transform, and attack success rate per transform over refreshes.",
)
def red_team_library(context: dg.AssetExecutionContext, storage: StorageResource, dream_recipe: DreamRecipeResource,
                     gate_recipe: GateRecipeResource, rhythms: RhythmsResource) -> dg.MaterializeResult:
    start, recipe = dream_start(context, storage, rhythms, dream_recipe)
    try:
        out = dream_run.refresh_library(storage.db_path, storage.root, start, recipe, gate_recipe.load(),
                                        log=context.log.info)
    except (dream_run.DreamError, candidates.CandidateError) as exc:
        raise dg.Failure(str(exc)) from exc
    cov = out.coverage
    curated = len(redteam.entries(storage.db_path, origin="curated"))
    return dg.MaterializeResult(metadata={
        "refresh_id": out.refresh_id,
        "candidate_id": out.candidate_id,
        "attacks": out.attempts,
        "attack_success_rate": round(out.succeeded / max(out.attempts, 1), 4),
        "entries_total": sum(c["attempts"] for by in cov["cells"].values() for c in by.values()),
        "curated_entries": curated,
        "coverage": dg.MetadataValue.md(redteam.coverage_markdown(cov)),
        "success_rate_plot": dg.MetadataValue.md(redteam.success_plot_markdown(cov)),
        **cycle_metadata(context),
    })


@dg.asset(
    group_name=DREAM_GROUP,
    deps=["compressed_checkpoint", "gate_suites", "red_team_library"],
    kinds={"pytorch", "duckdb"},
    description="Dream items made from the candidate compressed_checkpoint selected -- self-consistency voting, "
                "counterfactuals with computed answers, self-play red-team pairs with benign look-alikes, capped "
                "hard-example replay -- each recorded in DuckDB (dream_set) with its strategy, provenance, "
                "verification, agreement and the quality gate's decision (verifier, contamination with every gate "
                "suite including the frozen ones, corpus duplicates, reward-hacking guards). A seeded sample goes "
                "to rater_queue for people (`sleep-pipeline rater next`).",
)
def dream_set(context: dg.AssetExecutionContext, config: DreamConfig, storage: StorageResource,
              dream_recipe: DreamRecipeResource, gate_recipe: GateRecipeResource,
              rhythms: RhythmsResource) -> dg.MaterializeResult:
    start, recipe = dream_start(context, storage, rhythms, dream_recipe)
    try:
        out = dream_run.dream(storage.db_path, storage.root, start, recipe, gate_recipe.load(), log=context.log.info,
                              force=config.force)
    except (dream_run.DreamError, candidates.CandidateError) as exc:
        raise dg.Failure(str(exc)) from exc
    table = ["| strategy | items | accepted | of which pairs |", "|---|---|---|---|"]
    table += [f"| {s} | {v['items']} | {v['accepted']} | {v['pairs']} |" for s, v in sorted(out.by_strategy.items())]
    return dg.MaterializeResult(metadata={
        "dream_id": out.dream_id,
        "candidate_id": out.candidate_id,
        "unchanged": out.unchanged,
        "items": out.items,
        "accepted": out.accepted,
        "acceptance_rate": round(out.accepted / max(out.items, 1), 4),
        "strategies": dg.MetadataValue.md("\n".join(table)),
        "quality_gate": dg.MetadataValue.json(out.reasons),
        "strategy_stats": dg.MetadataValue.json(out.strategy_stats),
        "rater_queue": dg.MetadataValue.md(f"{len(out.rater_batch)} items queued for review in batch `{out.dream_id}`: "
                                           "`sleep-pipeline rater next`"),
        "path": dg.MetadataValue.path(str(out.path)),
        "seconds": out.seconds,
        **cycle_metadata(context),
    })


DREAM_WORKER = "sleep_pipeline.train.dream"


class DreamedConfig(dg.Config):
    resume: Literal["auto", "required", "never"] = "auto"  # never = discard intermediate checkpoints
    force: bool = False  # train again even when the same candidate, blend and recipe made a dreamed candidate


@dg.asset(
    group_name=DREAM_GROUP,
    deps=["dream_set"],
    kinds={"deepspeed", "pytorch", "safetensors"},
    description="The dreamed candidate: the candidate compressed_checkpoint selected, fine-tuned on blend(dpo pairs, "
                "synthetic, sft replay) of the dream set dream_set recorded (shares from the dream recipe; DPO + SFT "
                "with trl, full or LoRA) on the DeepSpeed resource, registered with that candidate as its parent. An "
                "int8 candidate is trained as the float weights it computes with and quantised again. Nothing to "
                "train on (or fine-tuning disabled): the Compress candidate goes to the Gate unchanged, and the "
                "metadata says why.",
)
def dreamed_checkpoint(context: dg.AssetExecutionContext, config: DreamedConfig, storage: StorageResource,
                       deepspeed: DeepSpeedClusterResource, dream_recipe: DreamRecipeResource,
                       compress_recipe: CompressRecipeResource, rhythms: RhythmsResource) -> dg.MaterializeResult:
    parent_id, recipe = dream_start(context, storage, rhythms, dream_recipe)
    dream_id = recorded(context, "dream_set", "dream_id")
    try:
        plan = finetune.prepare(storage.db_path, storage.root, parent_id, dream_id, recipe, force=config.force)
    except (dream_run.DreamError, candidates.CandidateError, KeyError) as exc:
        raise dg.Failure(str(exc)) from exc
    common = {"dream_id": dream_id, "dream_parent": plan.parent.candidate_id, **cycle_metadata(context)}
    if plan.skip:
        context.log.info(f"not dreaming: {plan.skip}; candidate {plan.parent.short} goes to the Gate unchanged")
        return dg.MaterializeResult(metadata={**plan.parent.to_metadata(), **common, "trained": False,
                                              "why_not_trained": plan.skip, "unchanged": True,
                                              "checkpoint": dg.MetadataValue.path(plan.parent.path)})
    blend_md = dg.MetadataValue.md(plan.blend.table_markdown()
                                   + "".join(f"\n\n- {n}" for n in plan.blend.notes))
    if plan.existing is not None:
        context.log.info(f"unchanged: candidate {plan.existing.short} was dreamed from {plan.parent.short} on blend "
                         f"{plan.blend.blend_id} with this recipe; not training again (run config force: true to retrain)")
        return dg.MaterializeResult(metadata={**plan.existing.to_metadata(), **common, "trained": True,
                                              "unchanged": True, "blend_id": plan.blend.blend_id, "blend": blend_md,
                                              "checkpoint": dg.MetadataValue.path(plan.existing.path)})
    context.log.info(f"dreaming on candidate {plan.parent.short}: {plan.blend.rows} rows "
                     f"({', '.join(f'{k} {v}' for k, v in plan.blend.counts.items())})")
    args = finetune.worker_args(plan, storage.root, storage.db_path, recipe)
    with learn.claim_run_dir(storage.root / "runs", finetune.run_key(plan, recipe), config.resume) as run_dir:
        context.log.info(f"run directory {run_dir}")
        results = deepspeed.run(context, DREAM_WORKER, [*args, "--resume", config.resume, "--run-dir", str(run_dir)],
                                extras={"dream_id": dream_id})
    reported, checkpoint = reported_checkpoint(results, "Dream worker")
    trained, served = finetune.finish(storage.db_path, storage.root, checkpoint, plan, compress_recipe.load(),
                                      log=context.log.info)
    return dg.MaterializeResult(metadata={
        **{k: v for k, v in reported.items() if k not in ("checkpoint", "checkpoint_sha256", "parents")},
        **served.to_metadata(),
        **common,
        "trained": True,
        "unchanged": False,
        "trained_candidate_id": trained.candidate_id,
        "requantized": served.candidate_id != trained.candidate_id,
        "blend_id": plan.blend.blend_id,
        "blend": blend_md,
        "checkpoint": dg.MetadataValue.path(served.path),
        "loss_curve": dg.MetadataValue.md(loss_curve_markdown(read_metrics(run_dir))),
        "run_dir": dg.MetadataValue.path(str(run_dir)),
    })
