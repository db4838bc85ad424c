"""Dream phase: ``red_team_library`` (self-play attacks on the candidate, coverage and success rates) and
``dream_set`` (synthetic items behind the quality gate, a sample queued for people to spot-check).

Both start from the candidate ``compressed_checkpoint`` selected. The dreamed candidate (fine-tuning on
the accepted items) follows them; until it is built the Gate judges the Compress candidate.
"""

import dagster as dg

from assets.lineage import recorded
from resources.storage import DreamRecipeResource, GateRecipeResource, StorageResource
from sleep_pipeline import candidates
from sleep_pipeline.dream import redteam
from sleep_pipeline.dream import run as dream_run

DREAM_GROUP = "dream"


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
                     gate_recipe: GateRecipeResource) -> dg.MaterializeResult:
    try:
        out = dream_run.refresh_library(storage.db_path, storage.root, recorded(context, "compressed_checkpoint",
                                                                                  "candidate_id"),
                                        dream_recipe.load(), gate_recipe.load(), log=context.log.info)
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
              dream_recipe: DreamRecipeResource, gate_recipe: GateRecipeResource) -> dg.MaterializeResult:
    try:
        out = dream_run.dream(storage.db_path, storage.root, recorded(context, "compressed_checkpoint", "candidate_id"),
                              dream_recipe.load(), gate_recipe.load(), log=context.log.info, force=config.force)
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
    })
