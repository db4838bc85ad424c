"""The launching side of a training phase: what to start from, whether training is needed at all,
which run directory a launch owns, and what becomes of the checkpoint it publishes.

* **Starting point.** A candidate id (or prefix), a model directory, or the recipe's model; the
  candidate ids it descends from are its lineage (``parents``), as the training runtime sees them.
* **No-op.** The same phase, data version, recipe and parents as an existing candidate whose files
  still verify: training again would publish the same model under a new name, so the existing
  candidate is the result.
* **Run directories** are unique per run: ``<phase>-<data version>-<recipe>-<start>-<time>-<random>``.
  A launch holds an ``flock`` on its directory; a later launch with the same inputs adopts the newest
  unfinished directory whose lock is free (its run was killed), so ``resume: auto`` still resumes,
  while two overlapping runs never share one.
* **After publishing**: the checkpoint is registered as a candidate and retention runs
  (:func:`sleep_pipeline.candidates.retain`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sleep_pipeline import candidates
from sleep_pipeline.config import stable_hash
from sleep_pipeline.train.runtime import STATE

LOCK = ".run.lock"


@dataclass(frozen=True)
class StartingPoint:
    path: Path | None  # None: build the recipe's model from its config
    parents: tuple[str, ...]
    ref: str | None  # what the user named (candidate id or directory), for --init-from

    @property
    def key(self) -> str:
        if self.parents:
            return self.parents[0][:12]
        return "dir-" + stable_hash(str(self.path))[:8] if self.path else "scratch"


def starting_point(db_path: Path | None, init_from: str | None, recipe) -> StartingPoint:
    """Where training starts and what it descends from, decided exactly as the training runtime decides
    it (:func:`sleep_pipeline.train.runtime.resolve_start`), so the no-op check and the published
    lineage agree. A bad reference raises :class:`~sleep_pipeline.candidates.CandidateError`."""
    from sleep_pipeline.train.runtime import WorkerError, resolve_start

    try:
        start = resolve_start(recipe, init_from, db_path, say=lambda _msg: None)
    except WorkerError as exc:
        raise candidates.CandidateError(str(exc)) from None
    return StartingPoint(start.directory, tuple(start.parents), init_from)


def unchanged(db_path: Path, phase: str, data_version: str, recipe_hash: str,
              start: StartingPoint) -> candidates.Candidate | None:
    """The existing candidate this launch would only reproduce, or None."""
    return candidates.find_same_inputs(db_path, phase, data_version, recipe_hash, start.parents)


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def claim_run_dir(runs_root: Path, key: str, resume: str = "auto") -> Iterator[Path]:
    """A run directory owned by this launch for the duration (see the module docstring)."""
    runs_root = Path(runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    candidates_dirs = [] if resume == "never" else sorted(
        (d for d in runs_root.glob(f"{key}-*") if d.is_dir() and _state(d).get("status") != "finished"),
        key=lambda d: d.stat().st_mtime, reverse=True)
    for run_dir in candidates_dirs:
        fh = open(run_dir / LOCK, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()  # another run is using it right now
            continue
        try:
            yield run_dir
        finally:
            fh.close()
        return
    run_dir = runs_root / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir()
    with open(run_dir / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield run_dir


def run_key(phase: str, data_version: str, recipe_hash: str, start: StartingPoint) -> str:
    return f"{phase}-{data_version}-{recipe_hash}-{start.key}"


def finish(db_path: Path, checkpoint: Path, keep_last: int, log=None) -> candidates.Candidate:
    """Register the published checkpoint as a candidate, then apply retention to its directory."""
    cand = candidates.register(db_path, checkpoint)
    candidates.retain(db_path, Path(checkpoint).parent, keep_last, log=log)
    return cand
