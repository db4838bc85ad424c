"""Where the pipeline keeps its files and its DuckDB database."""

from pathlib import Path
from typing import Optional

import dagster as dg

from sleep_pipeline.compress.recipe import CompressRecipe, load_compress_recipe
from sleep_pipeline.config import DataRecipe, load_data_recipe
from sleep_pipeline.dream.recipe import DreamRecipe, load_dream_recipe
from sleep_pipeline.gate.decide import GateRecipe, load_gate_recipe
from sleep_pipeline.memory.index import MemoryRecipe, load_memory_recipe
from sleep_pipeline.rhythms import Rhythm, Rhythms, load_rhythms
from sleep_pipeline.train.recipe import TrainRecipe, load_train_recipe


class StorageResource(dg.ConfigurableResource):
    """Local storage root: generated sources, the DuckDB file, data mixes, checkpoints."""

    root_dir: str
    duckdb_file: str = "sleep.duckdb"

    @property
    def root(self) -> Path:
        return Path(self.root_dir).expanduser().resolve()

    @property
    def db_path(self) -> Path:
        return self.root / self.duckdb_file

    @property
    def mixes_dir(self) -> Path:
        return self.root / "mixes"

    @property
    def learn_checkpoints(self) -> Path:
        """Where Learn publishes its checkpoints (the Gate's candidates)."""
        return self.root / "checkpoints" / "learn"


class DataRecipeResource(dg.ConfigurableResource):
    """The data recipes (``sources.yaml``, ``data.yaml``), validated each time they are read."""

    recipes_dir: str

    def load(self, storage: StorageResource) -> DataRecipe:
        return load_data_recipe(self.recipes_dir, storage.root)


class TrainRecipeResource(dg.ConfigurableResource):
    """A training recipe (``recipes/learn.yaml``), validated each time it is read. A rhythm may bring its
    own Learn recipe (rhythms.yaml: ``recipes.learn``; the monthly rhythm's large Learn, say)."""

    path: str
    storage_dir: Optional[str] = None  # what {storage} in model.path stands for (the storage resource's root)

    def load(self, rhythm: Rhythm | None = None) -> TrainRecipe:
        return load_train_recipe((rhythm.recipes.get("learn") if rhythm else None) or self.path, self.storage_dir)


class GateRecipeResource(dg.ConfigurableResource):
    """The gate recipe (``recipes/gate.yaml``): suites, judge, noise, thresholds per rhythm."""

    path: str

    def load(self) -> GateRecipe:
        return load_gate_recipe(self.path)


class CompressRecipeResource(dg.ConfigurableResource):
    """The Compress recipe (``recipes/compress.yaml``): quick suite, cost axis, steps, red lines."""

    path: str

    def load(self) -> CompressRecipe:
        return load_compress_recipe(self.path)


class DreamRecipeResource(dg.ConfigurableResource):
    """The Dream recipe (``recipes/dream.yaml``): generator, strategies, quality gate, rater sample. A
    rhythm may bring its own (rhythms.yaml: ``recipes.dream``)."""

    path: str

    def load(self, rhythm: Rhythm | None = None) -> DreamRecipe:
        return load_dream_recipe((rhythm.recipes.get("dream") if rhythm else None) or self.path)


class RhythmsResource(dg.ConfigurableResource):
    """The rhythms (``recipes/rhythms.yaml``): slots, cycle ids, gate rhythm, channel, soak, trigger."""

    recipes_dir: str

    def load(self) -> Rhythms:
        return load_rhythms(self.recipes_dir)

    def of(self, name: str | None) -> Rhythm | None:
        """The rhythm ``name`` (a run's rhythm tag), or None outside a rhythm."""
        return self.load().get(name)


class MemoryRecipeResource(dg.ConfigurableResource):
    """The retrieval index recipe (``recipes/memory.yaml``): knowledge sources, questions, quality control."""

    recipes_dir: str

    def load(self, storage: StorageResource) -> MemoryRecipe:
        return load_memory_recipe(self.recipes_dir, storage.root)
