"""The launching side of the Dream fine-tune: what to train on, whether training is needed at all, and
what becomes of the checkpoint the worker (:mod:`sleep_pipeline.train.dream`) publishes.

* :func:`prepare` -- the candidate Compress selected and the dream set made from it give the blend
  (:mod:`sleep_pipeline.dream.blend`); or the reason nothing is trained (fine-tuning disabled, nothing
  accepted), in which case the Compress candidate goes to the Gate unchanged; or the existing dreamed
  candidate trained from the same candidate, blend, training recipe and DPO settings.
* :func:`finish` -- registers the published checkpoint (phase ``dream``, parent: the Compress candidate).
  An int8 parent was trained as the float weights it computes with; the result is quantised again the
  way the parent was (SmoothQuant with the parent's alpha, calibrated on the same mix rows), so the Gate
  judges a model that costs what the selected one costs. That int8 checkpoint is the dreamed candidate,
  its parent the float one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sleep_pipeline import candidates
from sleep_pipeline.checkpoint import read_manifest
from sleep_pipeline.data.mix import manifest_of
from sleep_pipeline.dream import blend as blending
from sleep_pipeline.dream.recipe import DreamRecipe
from sleep_pipeline.dream.run import MANIFEST as DREAM_MANIFEST, DreamError, dreams_root
from sleep_pipeline.train.recipe import TrainRecipe, load_train_recipe

PHASE = "dream"
SUBDIR = "dream"


@dataclass
class Plan:
    parent: candidates.Candidate
    dream_id: str
    skip: str | None = None  # why nothing is trained (the parent goes to the Gate)
    blend: blending.Blend | None = None
    train_recipe: TrainRecipe | None = None
    existing: candidates.Candidate | None = None  # the dreamed candidate these inputs already made


def checkpoints_root(storage_root: Path) -> Path:
    return Path(storage_root) / "checkpoints" / SUBDIR


def prepare(db_path: Path, storage_root: Path, parent_id: str, dream_id: str, recipe: DreamRecipe,
            force: bool = False) -> Plan:
    parent = candidates.get(db_path, parent_id)
    ft = recipe.finetune
    if not ft.enabled:
        return Plan(parent, dream_id, skip="fine-tuning is disabled in the dream recipe (finetune.enabled: false)")
    dream_dir = dreams_root(storage_root) / dream_id
    info_path = dream_dir / DREAM_MANIFEST
    if not info_path.is_file():
        raise DreamError(f"dream set {dream_id} has no files at {dream_dir}: materialise dream_set again")
    info = json.loads(info_path.read_text())
    if info.get("candidate_id") != parent.candidate_id:
        raise DreamError(f"dream set {dream_id} was made from candidate {str(info.get('candidate_id'))[:12]}, not from "
                         f"{parent.short} (the one compressed_checkpoint selected): materialise dream_set again")
    if not info.get("accepted"):
        return Plan(parent, dream_id, skip=f"dream set {dream_id} accepted no items: nothing to fine-tune on")
    files = manifest_of(db_path, parent.data_version)["files"]
    try:
        blend = blending.build_blend(dream_dir, dream_id, files, parent.data_version, ft, recipe.seed)
    except blending.BlendError as exc:
        return Plan(parent, dream_id, skip=str(exc))
    train_recipe = load_train_recipe(ft.recipe, storage_root)
    existing = None if force else unchanged(db_path, parent, blend.blend_id, train_recipe, recipe)
    return Plan(parent, dream_id, blend=blend, train_recipe=train_recipe, existing=existing)


def unchanged(db_path: Path, parent: candidates.Candidate, blend_id: str, train_recipe: TrainRecipe,
              recipe: DreamRecipe) -> candidates.Candidate | None:
    """The dreamed candidate (the served one: the re-quantised child of an int8 parent's dream) already
    trained from this parent on this blend with this training recipe and these DPO settings, whose files
    still verify; else None. The data version is the parent's and does not name the blend: the
    manifests do."""
    trained = candidates.find_same_inputs(
        db_path, PHASE, parent.data_version, train_recipe.recipe_hash(), (parent.candidate_id,),
        where=lambda m: (m.get("dream_blend"), m.get("preference_beta"), m.get("preference_sft_weight"))
        == (blend_id, *objective(recipe)))
    return None if trained is None else served_child(db_path, trained) or trained


def served_child(db_path: Path, trained: candidates.Candidate) -> candidates.Candidate | None:
    """The int8 dreamed candidate made from ``trained`` (a float dream of an int8 parent), if any."""
    return candidates.find_same_inputs(db_path, PHASE, trained.data_version, trained.recipe_hash,
                                       (trained.candidate_id,))


def objective(recipe: DreamRecipe) -> tuple[float, float]:
    """What the fine-tune optimises beyond its training recipe: DPO's beta and the SFT term's weight (they
    come from the dream recipe). A dreamed candidate is reused, and a run resumed, only under the same."""
    return recipe.finetune.beta, recipe.finetune.sft_weight


def run_key(plan: Plan, recipe: DreamRecipe) -> str:
    """The run directory's key: an interrupted run is resumed only under the same parent, blend, training
    recipe and objective."""
    beta, sft_weight = objective(recipe)
    return f"dream-{plan.blend.blend_id}-{plan.train_recipe.recipe_hash()}-b{beta:g}-s{sft_weight:g}-{plan.parent.short}"


def worker_args(plan: Plan, storage_root: Path, db_path: Path, recipe: DreamRecipe) -> list[str]:
    return ["--recipe", plan.train_recipe.source, "--data-dir", str(plan.blend.path),
            "--out-root", str(checkpoints_root(storage_root)), "--data-version", plan.parent.data_version,
            "--init-from", plan.parent.candidate_id, "--db", str(db_path), "--storage-dir", str(storage_root),
            "--beta", str(recipe.finetune.beta), "--sft-weight", str(recipe.finetune.sft_weight)]


def finish(db_path: Path, storage_root: Path, checkpoint: Path, plan: Plan, compress_recipe,
           log=print) -> tuple[candidates.Candidate, candidates.Candidate]:
    """(the trained candidate, the dreamed candidate the Gate judges): see the module docstring."""
    from sleep_pipeline.compress import quantize

    trained = candidates.register(db_path, Path(checkpoint), PHASE)
    served = trained
    if quantize.is_int8(Path(plan.parent.path)):
        served = requantize(db_path, storage_root, trained, plan.parent, compress_recipe, log)
    candidates.retain(db_path, checkpoints_root(storage_root), plan.train_recipe.keep_last, log=log)
    return trained, served


def requantize(db_path: Path, storage_root: Path, trained: candidates.Candidate, like: candidates.Candidate,
               compress_recipe, log=print) -> candidates.Candidate:
    """``trained`` quantised to int8 the way ``like`` was, published and registered as its child."""
    from sleep_pipeline.compress import quantize
    from sleep_pipeline.compress.run import batches, publish_model
    from sleep_pipeline.gate.evaluate import load_for_eval
    from sleep_pipeline.train.modeling import read_jsonl

    how = json.loads((Path(like.path) / quantize.QUANTIZATION).read_text())
    alpha = (how.get("smoothquant") or {}).get("alpha", 0.0)
    qz = compress_recipe.quantize
    model, tok = load_for_eval(Path(trained.path))
    calib = None
    if alpha > 0:
        rows = read_jsonl(Path(manifest_of(db_path, trained.data_version)["files"]["train"]))[: qz.calibration_rows]
        calib = batches(tok, rows, 4, qz.max_seq_len)  # as Compress calibrated the parent
    log(f"quantising the dreamed weights to int8 like {like.short} (SmoothQuant alpha {alpha})")
    qmodel, tensors, info = quantize.quantize(model, calibration=calib, alpha=alpha)
    manifest = read_manifest(Path(trained.path))
    lineage = {"phase": PHASE, "kind": PHASE, "parents": [trained.candidate_id], "data_version": trained.data_version,
               "recipe_hash": manifest.get("recipe_hash"), "recipe": manifest.get("recipe"), "base_model": trained.path,
               "compression": "int8", "compression_details": {"method": info["method"], "like": like.candidate_id,
                                                              "smoothquant": info["smoothquant"]},
               **{k: manifest.get(k) for k in ("dream_id", "dream_blend", "training_data")}}
    return publish_model(storage_root, db_path, qmodel, tok, lineage, "dream-int8", int8=(tensors, info), subdir=SUBDIR)


def dream_source(db_path: Path, candidate_path: Path) -> tuple[str | None, str | None]:
    """(the dream set behind a candidate, the candidate its Dream started from), walking up through
    dream-phase parents; (None, None) for a candidate that was never dreamed."""
    path, dream_id = Path(candidate_path), None
    for _ in range(8):
        manifest = read_manifest(path)
        parents = manifest.get("parents") or []
        if manifest.get("phase") != PHASE or not parents:
            break
        dream_id = dream_id or manifest.get("dream_id")
        try:
            path, cand = candidates.resolve(db_path, parents[0])
        except candidates.CandidateError:
            return dream_id, parents[0]
        if cand is not None and cand.phase != PHASE:
            return dream_id, cand.candidate_id
    return dream_id, None
