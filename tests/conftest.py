"""Shared fixtures: the embedded default's recipes in a temporary storage dir, generated once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from sleep_pipeline.config import load_data_recipe
from sleep_pipeline.data.generate import generate_source
from sleep_pipeline.train.shm import sweep_stale_segments

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def pytest_sessionstart(session):
    # Shared memory that killed DeepSpeed runs of earlier sessions left behind is RAM this run needs.
    sweep_stale_segments()


def copy_recipes(dest: Path) -> Path:
    """The shipped recipes in ``dest``, Compress shrunk (:func:`shrink_compress`)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("sources.yaml", "data.yaml", "learn.yaml", "gate.yaml", "compress.yaml", "distil.yaml", "dream.yaml",
                 "dream_train.yaml", "dream_daily.yaml", "dream_train_daily.yaml", "rhythms.yaml", "memory.yaml",
                 "learn_monthly.yaml"):
        shutil.copy(RECIPES / name, dest / name)
    shutil.copytree(RECIPES / "model", dest / "model", dirs_exist_ok=True)
    shutil.copytree(RECIPES / "lm_eval_tasks", dest / "lm_eval_tasks", dirs_exist_ok=True)
    return shrink_dream(shrink_compress(dest))


def shrink_dream(recipes: Path) -> Path:
    """The shipped Dream recipes with a few prompts per strategy and a few fine-tuning steps (the plumbing is the
    subject)."""
    for dream, train_name in (("dream.yaml", "dream_train.yaml"), ("dream_daily.yaml", "dream_train_daily.yaml")):
        if not (recipes / dream).exists():
            continue
        raw = yaml.safe_load((recipes / dream).read_text())
        raw["self_consistency"].update(prompts=4, samples=2, max_new_tokens=16)
        raw["counterfactual"].update(items=6)
        raw["red_team"].update(seeds=8, benign=4, max_new_tokens=16, library_per_cell=1)
        (recipes / dream).write_text(yaml.safe_dump(raw))
        train = yaml.safe_load((recipes / train_name).read_text())
        train["training"].update(max_steps=4, save_steps=4, logging_steps=1)
        (recipes / train_name).write_text(yaml.safe_dump(train))
    return recipes


def shrink_compress(recipes: Path, examples: int = 4, steps: int = 4) -> Path:
    """The shipped Compress recipe with a few items per quick-suite task and a few training steps: in a test
    the plumbing is the subject, not the figures."""
    raw = yaml.safe_load((recipes / "compress.yaml").read_text())
    raw["quick_suite"].update(examples=examples, diversity_samples=2)
    raw["prune"].update(recovery_steps=steps, calibration_rows=8)
    raw["cost"].update(new_tokens=8, batch_size=4)
    (recipes / "compress.yaml").write_text(yaml.safe_dump(raw))
    distil = yaml.safe_load((recipes / "distil.yaml").read_text())
    distil["training"].update(max_steps=steps, eval_steps=steps, save_steps=steps, logging_steps=1)
    (recipes / "distil.yaml").write_text(yaml.safe_dump(distil))
    return recipes


def gate_raw() -> dict:
    """recipes/gate.yaml as data, its user tasks' directories made absolute (so a copy loads anywhere)."""
    raw = yaml.safe_load((RECIPES / "gate.yaml").read_text())
    for task in raw.get("user_tasks") or []:
        if task.get("include_path"):
            task["include_path"] = str((RECIPES / task["include_path"]).resolve())
    return raw


@pytest.fixture(scope="session")
def generated_sources(tmp_path_factory) -> Path:
    """A storage dir whose sources/ holds the embedded default's generated files (made once)."""
    storage = tmp_path_factory.mktemp("generated")
    recipe = load_data_recipe(RECIPES, storage)
    for src in recipe.sources:
        generate_source(src, max_record_bytes=recipe.quality.max_record_bytes)
    return storage


@pytest.fixture
def storage(tmp_path, generated_sources) -> Path:
    """A fresh storage dir (empty database) with the generated sources copied in."""
    dest = tmp_path / "storage"
    shutil.copytree(generated_sources / "sources", dest / "sources")
    return dest


@pytest.fixture
def recipes_dir(tmp_path) -> Path:
    return copy_recipes(tmp_path / "recipes")
