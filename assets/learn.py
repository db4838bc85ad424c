"""Learn phase: ``trained_checkpoint``, SFT on the data mix, run out of process on the DeepSpeed resource.

It trains on the data version ``tiered_data_mix`` recorded, from the starting point the run config or
the recipe names, and records the candidate it produced (or, when an identical candidate already
exists, that one, without training again).
"""

from pathlib import Path
from typing import Literal, Optional

import dagster as dg

from assets.lineage import cycle_metadata, recorded, rhythm_of
from resources.deepspeed import DeepSpeedClusterResource, reported_checkpoint
from resources.storage import RhythmsResource, StorageResource, TrainRecipeResource
from sleep_pipeline import candidates
from sleep_pipeline.data.mix import manifest_of
from sleep_pipeline.plots import loss_curve_markdown
from sleep_pipeline.train import learn
from sleep_pipeline.train.runtime import read_metrics

LEARN_GROUP = "learn"
WORKER_MODULE = "sleep_pipeline.train.sft"
PHASE = "learn"


class LearnConfig(dg.Config):
    resume: Literal["auto", "required", "never"] = "auto"  # never = discard intermediate checkpoints
    init_from: Optional[str] = None  # a candidate id (or prefix) or a model directory; default: the recipe's model
    force: bool = False  # train even when a candidate with the same inputs exists


@dg.asset(
    group_name=LEARN_GROUP,
    deps=["tiered_data_mix"],
    kinds={"deepspeed", "pytorch", "safetensors"},
    description="SFT on the train split of the data version tiered_data_mix recorded (validation loss on its "
                "validation split), launched with the deepspeed launcher; a verified safetensors checkpoint "
                "registered as a learn candidate. Same data, recipe and starting model as an existing candidate: "
                "that candidate, unchanged, without training.",
)
def trained_checkpoint(context: dg.AssetExecutionContext, config: LearnConfig, storage: StorageResource,
                       deepspeed: DeepSpeedClusterResource, learn_recipe: TrainRecipeResource,
                       rhythms: RhythmsResource) -> dg.MaterializeResult:
    recipe = learn_recipe.load(rhythms.of(rhythm_of(context)))
    data_version = recorded(context, "tiered_data_mix", "version_id")
    manifest = manifest_of(storage.db_path, data_version)
    try:
        start = learn.starting_point(storage.db_path, config.init_from, recipe)
    except candidates.CandidateError as exc:
        raise dg.Failure(str(exc)) from exc
    existing = None if config.force else learn.unchanged(storage.db_path, PHASE, data_version, recipe.recipe_hash(), start)
    if existing is not None:
        context.log.info(f"unchanged: candidate {existing.short} was trained from the same data version, recipe and "
                         f"starting model ({existing.path}); not training again (run config force: true to retrain)")
        return dg.MaterializeResult(metadata={**existing.to_metadata(), **cycle_metadata(context), "unchanged": True,
                                              "checkpoint": dg.MetadataValue.path(existing.path)})
    data_dir = Path(manifest["files"]["train"]).parent
    args = ["--recipe", recipe.source, "--data-dir", str(data_dir), "--out-root", str(storage.learn_checkpoints),
            "--data-version", data_version, "--resume", config.resume, "--db", str(storage.db_path),
            "--storage-dir", str(storage.root)]
    if start.ref:
        args += ["--init-from", start.ref]
    with learn.claim_run_dir(storage.root / "runs", learn.run_key(PHASE, data_version, recipe.recipe_hash(), start),
                             config.resume) as run_dir:
        context.log.info(f"run directory {run_dir}")
        results = deepspeed.run(context, WORKER_MODULE, [*args, "--run-dir", str(run_dir)],
                                extras={"data_version": data_version})
    reported, checkpoint = reported_checkpoint(results, "Learn worker")
    cand = learn.finish(storage.db_path, checkpoint, recipe.keep_last, log=context.log.info)
    return dg.MaterializeResult(metadata={
        **reported,
        **cand.to_metadata(),
        **cycle_metadata(context),
        "unchanged": False,
        "checkpoint": dg.MetadataValue.path(cand.path),
        "loss_curve": dg.MetadataValue.md(loss_curve_markdown(read_metrics(run_dir))),
        "run_dir": dg.MetadataValue.path(str(run_dir)),
    })
