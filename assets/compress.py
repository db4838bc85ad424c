"""Compress phase: ``compressed_checkpoint``, from the candidate Learn produced to the one the Gate judges.

It compresses the candidate ``trained_checkpoint`` recorded (merge, prune, distil on the DeepSpeed
resource, int8), measures every candidate and the parent on the quick suite, diversity and cost in
one run, records them in DuckDB, and records the selected candidate's id for the Gate. The
capability–cost table and the Pareto plot are in the metadata.
"""

from pathlib import Path

import dagster as dg

from assets.lineage import cycle_metadata, recorded
from resources.deepspeed import DeepSpeedClusterResource, reported_checkpoint
from resources.storage import CompressRecipeResource, GateRecipeResource, StorageResource
from sleep_pipeline import candidates
from sleep_pipeline.compress import pareto
from sleep_pipeline.compress import run as compress_run
from sleep_pipeline.data.mix import manifest_of
from sleep_pipeline.train import learn
from sleep_pipeline.train.recipe import load_train_recipe

COMPRESS_GROUP = "compress"
DISTIL_MODULE = "sleep_pipeline.train.distil"


class CompressConfig(dg.Config):
    force: bool = False  # compress again even when this recipe already compressed this candidate


@dg.asset(
    group_name=COMPRESS_GROUP,
    deps=["trained_checkpoint"],
    kinds={"pytorch", "deepspeed", "duckdb"},
    description="Compressed candidates of the candidate trained_checkpoint recorded -- LoRA merge behind an A/B check, "
                "structured pruning with a recovery fine-tune, distillation from the live release (or the parent) on "
                "the DeepSpeed resource, int8 -- each measured with the parent on the quick suite, diversity and cost, "
                "recorded in DuckDB (compress_measurements). Records the cheapest candidate on the capability-cost "
                "Pareto front within the red lines (or the parent, and why) for the Gate.",
)
def compressed_checkpoint(context: dg.AssetExecutionContext, config: CompressConfig, storage: StorageResource,
                          deepspeed: DeepSpeedClusterResource, compress_recipe: CompressRecipeResource,
                          gate_recipe: GateRecipeResource) -> dg.MaterializeResult:
    recipe = compress_recipe.load()
    parent_id = recorded(context, "trained_checkpoint", "candidate_id")

    def launch_distil(args: list[str]) -> str:
        parent = candidates.get(storage.db_path, parent_id)
        train_recipe = load_train_recipe(recipe.distil.recipe, storage.root)
        data_dir = Path(manifest_of(storage.db_path, parent.data_version)["files"]["train"]).parent
        key = f"distil-{parent.data_version}-{recipe.recipe_hash()}-{args[1][:12]}"
        with learn.claim_run_dir(storage.root / "runs", key) as run_dir:
            results = deepspeed.run(context, DISTIL_MODULE, [
                "--recipe", train_recipe.source, "--data-dir", str(data_dir),
                "--out-root", str(compress_run.checkpoints_root(storage.root)), "--data-version", parent.data_version,
                "--db", str(storage.db_path), "--storage-dir", str(storage.root), "--run-dir", str(run_dir), *args])
        return str(reported_checkpoint(results, "distillation worker")[1])

    try:
        out = compress_run.compress(storage.db_path, storage.root, parent_id, recipe, gate_recipe.load(),
                                    launch_distil=launch_distil, log=context.log.info, force=config.force)
    except (compress_run.CompressError, candidates.CandidateError) as exc:
        raise dg.Failure(str(exc)) from exc
    chosen = next(p for p in out.points if p.selected)
    return dg.MaterializeResult(metadata={
        **out.selected.to_metadata(),
        "selected_kind": chosen.kind,
        "selection": chosen.verdict,
        "parent_candidate_id": out.parent.candidate_id,
        "compress_run": out.run_id,
        "unchanged": out.unchanged,
        "checkpoint": dg.MetadataValue.path(out.selected.path),
        "candidates": dg.MetadataValue.md(pareto.table_markdown(out.points, recipe.cost.metric)),
        "pareto_plot": dg.MetadataValue.md(pareto.plot_markdown(out.points, recipe.cost.metric, recipe.red_lines)),
        "red_lines": dg.MetadataValue.json(recipe.red_lines),
        "notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in out.notes) or "none"),
        "merge_steps": dg.MetadataValue.json(out.merge_steps),
        "seconds": out.seconds,
        **cycle_metadata(context),
    })
