"""The code location: wires assets/, resources/ and schedules/ into one ``dg.Definitions``.

``SLEEP_PIPELINE_HOME`` chooses the storage directory (default ``.sleep_pipeline`` beside this file)
and ``SLEEP_PIPELINE_RECIPES`` the recipe directory (default ``recipes``). ``SLEEP_PIPELINE_EXECUTOR``
picks how a run executes its steps: ``multiprocess`` (the default: one process per step, independent
steps side by side) or ``in_process`` (every step in the run's own process: no per-step start-up, for a
small machine). The recipes are validated
here, so a bad one stops the code location from loading with a message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from assets.compress import compressed_checkpoint
from assets.data import build_data_assets
from assets.dream import dream_set, dreamed_checkpoint, red_team_library
from assets.gate import capability_gate, gate_report, gate_suites, gated_release, safety_gate
from assets.learn import trained_checkpoint
from assets.memory import retrieval_index
from assets.data import DATA_GROUP, SOURCE_GROUP
from assets.release import promote_canary, raise_alarm, rollback_release
from resources import ray_cluster
from resources.deepspeed import DeepSpeedClusterResource
from resources.storage import (CompressRecipeResource, DataRecipeResource, DreamRecipeResource, GateRecipeResource,
                               MemoryRecipeResource, RhythmsResource, StorageResource, TrainRecipeResource)
from schedules.jobs import build_automation, sleep_cycle_job
from sleep_pipeline.compress.recipe import load_compress_recipe
from sleep_pipeline.config import load_data_recipe
from sleep_pipeline.dream.recipe import load_dream_recipe
from sleep_pipeline.gate.decide import load_gate_recipe
from sleep_pipeline.memory.index import load_memory_recipe
from sleep_pipeline.rhythms import load_rhythms
from sleep_pipeline.train.recipe import load_train_recipe

PROJECT_ROOT = Path(__file__).resolve().parent
EXECUTORS = {"multiprocess": dg.multiprocess_executor, "in_process": dg.in_process_executor}


def build_defs(recipes_dir: str | Path | None = None, storage_dir: str | Path | None = None) -> dg.Definitions:
    recipes_dir = Path(recipes_dir or os.environ.get("SLEEP_PIPELINE_RECIPES") or PROJECT_ROOT / "recipes")
    storage_dir = Path(storage_dir or os.environ.get("SLEEP_PIPELINE_HOME") or PROJECT_ROOT / ".sleep_pipeline")
    recipe = load_data_recipe(recipes_dir, storage_dir)
    load_train_recipe(recipes_dir / "learn.yaml", storage_dir)  # validated now: a bad recipe stops the load
    load_gate_recipe(recipes_dir / "gate.yaml")
    compress = load_compress_recipe(recipes_dir / "compress.yaml")
    if compress.distil.enabled:
        load_train_recipe(compress.distil.recipe, storage_dir)
    rhythms = load_rhythms(recipes_dir)
    for r in rhythms.rhythms.values():  # a rhythm's own Learn recipe is validated now too
        if "learn" in r.recipes:
            load_train_recipe(r.recipes["learn"], storage_dir)
    load_memory_recipe(recipes_dir, storage_dir)
    for path in [recipes_dir / "dream.yaml", *(r.recipes["dream"] for r in rhythms.rhythms.values() if "dream" in r.recipes)]:
        dream = load_dream_recipe(path)
        if dream.finetune.enabled:
            load_train_recipe(dream.finetune.recipe, storage_dir)
    assets, checks = build_data_assets(recipe)
    phase_keys = {
        "index": [retrieval_index.key],
        "learn": [a.key for a in assets if a.group_names_by_key[a.key] in (SOURCE_GROUP, DATA_GROUP)]
                 + [trained_checkpoint.key],
        "compress": [compressed_checkpoint.key],
        "dream": [gate_suites.key, red_team_library.key, dream_set.key, dreamed_checkpoint.key],
        "gate": [gate_report.key],
        "release": [gated_release.key],
    }
    schedules, sensors = build_automation(rhythms, phase_keys)
    executor = os.environ.get("SLEEP_PIPELINE_EXECUTOR", "multiprocess")
    if executor not in EXECUTORS:
        raise ValueError(f"SLEEP_PIPELINE_EXECUTOR must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    return dg.Definitions(
        assets=[*assets, trained_checkpoint, compressed_checkpoint, red_team_library, dream_set, dreamed_checkpoint,
                gate_suites, gate_report,
                gated_release, retrieval_index],
        asset_checks=[*checks, capability_gate, safety_gate],
        jobs=[sleep_cycle_job, rollback_release, promote_canary, raise_alarm],
        schedules=schedules,
        sensors=sensors,
        executor=EXECUTORS[executor],
        resources={
            "storage": StorageResource(root_dir=str(storage_dir)),
            "data_recipe": DataRecipeResource(recipes_dir=str(recipes_dir)),
            "learn_recipe": TrainRecipeResource(path=str(recipes_dir / "learn.yaml"), storage_dir=str(storage_dir)),
            "gate_recipe": GateRecipeResource(path=str(recipes_dir / "gate.yaml")),
            "compress_recipe": CompressRecipeResource(path=str(recipes_dir / "compress.yaml")),
            "dream_recipe": DreamRecipeResource(path=str(recipes_dir / "dream.yaml")),
            "rhythms": RhythmsResource(recipes_dir=str(recipes_dir)),
            "memory_recipe": MemoryRecipeResource(recipes_dir=str(recipes_dir)),
            "ray_cluster": ray_cluster.from_environment(),
            "deepspeed": DeepSpeedClusterResource(
                accelerator=os.environ.get("SLEEP_PIPELINE_ACCELERATOR", "cpu"),
                num_gpus=int(os.environ.get("SLEEP_PIPELINE_NUM_GPUS", "2")),
                max_runtime_s=float(os.environ.get("SLEEP_PIPELINE_MAX_STEP_SECONDS", 8 * 3600)),
            ),
        },
    )


defs = build_defs()
