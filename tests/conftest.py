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
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("sources.yaml", "data.yaml", "learn.yaml", "gate.yaml"):
        shutil.copy(RECIPES / name, dest / name)
    shutil.copytree(RECIPES / "model", dest / "model", dirs_exist_ok=True)
    shutil.copytree(RECIPES / "lm_eval_tasks", dest / "lm_eval_tasks", dirs_exist_ok=True)
    return dest


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
