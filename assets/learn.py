"""Learn phase: ``trained_checkpoint``, SFT on the data mix, run out of process on the DeepSpeed resource."""

import json
from pathlib import Path
from typing import Literal

import dagster as dg

from resources.deepspeed import DeepSpeedClusterResource
from resources.storage import StorageResource, TrainRecipeResource
from sleep_pipeline.data.mix import latest_manifest
from sleep_pipeline.plots import loss_curve_markdown

LEARN_GROUP = "learn"
WORKER_MODULE = "sleep_pipeline.train.sft"


class LearnConfig(dg.Config):
    resume: Literal["auto", "required", "never"] = "auto"  # never = discard intermediate checkpoints


@dg.asset(
    group_name=LEARN_GROUP,
    deps=["tiered_data_mix"],
    kinds={"deepspeed", "pytorch", "safetensors"},
    description="SFT on the train split of the current data mix (validation loss on its validation split), "
                "launched with the deepspeed launcher; a verified safetensors checkpoint with a manifest.",
)
def trained_checkpoint(context: dg.AssetExecutionContext, config: LearnConfig, storage: StorageResource,
                       deepspeed: DeepSpeedClusterResource, learn_recipe: TrainRecipeResource) -> dg.MaterializeResult:
    recipe = learn_recipe.load()
    manifest = latest_manifest(storage.db_path)
    if not manifest:
        raise RuntimeError("no data version: materialise tiered_data_mix first")
    data_dir = Path(manifest["files"]["train"]).parent
    run_dir = storage.root / "runs" / f"learn-{manifest['version_id']}-{recipe.recipe_hash()}"
    results = deepspeed.run(
        context, WORKER_MODULE,
        ["--recipe", recipe.source, "--data-dir", str(data_dir), "--run-dir", str(run_dir),
         "--out-root", str(storage.learn_checkpoints), "--data-version", manifest["version_id"],
         "--resume", config.resume],
        extras={"data_version": manifest["version_id"]},
    )
    reported = {}
    for r in results:
        reported.update({k: v for k, v in (r.metadata or {}).items()})
    if "checkpoint" not in reported:
        raise RuntimeError("the worker finished without reporting a checkpoint")
    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    value = lambda k: getattr(reported.get(k), "value", reported.get(k))  # noqa: E731
    return dg.MaterializeResult(metadata={
        **reported,
        "checkpoint": dg.MetadataValue.path(value("checkpoint")),
        "loss_curve": dg.MetadataValue.md(loss_curve_markdown(metrics)),
        "data_version": manifest["version_id"],
    })
