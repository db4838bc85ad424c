"""Import a pretrained model as a candidate: a local GGUF file or a local Hugging Face model directory.

    sleep-pipeline import PATH [--gguf-file NAME] [--name NAME] [--home STORAGE_DIR]

The source becomes a plain checkpoint (safetensors weights, config, generation config, and the model's
own tokenizer with its own chat template) written through the checkpoint contract
(:mod:`sleep_pipeline.checkpoint`: staging, manifest, digest, verified reload, atomic rename) and
registered as a candidate of phase ``import`` with no parents and ``base_model`` = the source's identity
(``"<file name> sha256:<digest>"``; for a directory, the digest of its files' digests). A GGUF file is
read by transformers (the ``gguf`` package) and dequantised to float32, the weights exactly as the
quantised file encodes them. Pickle-based weights are never loaded.

Layout under the storage directory::

    models/imported/import-<name>-<source sha256[:12]>/   the candidate
    models/<name>                                         a stable alias (relative symlink) to the newest
                                                          import under that name: a recipe names it as
                                                          ``{storage}/models/<name>``

Importing the same source again does nothing and reports the existing candidate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sleep_pipeline.candidates import GONE, Candidate, list_candidates, register
from sleep_pipeline.checkpoint import (UNSAFE_SUFFIXES, CheckpointError, abandoned_staging, publish, read_manifest,
                                       sha256_file, staging_dir, verify_checkpoint)

PHASE = "import"
IMPORTED = "imported"  # candidates live in models/imported/, aliases in models/
GGUF_MAGIC = b"GGUF"
_QUANT_SUFFIX = re.compile(r"[.-](i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


class ModelImportError(RuntimeError):
    """A source that cannot be imported (missing, not a model, pickle-only, unreadable)."""


@dataclass(frozen=True)
class Source:
    kind: str  # "gguf" | "hf"
    path: Path  # the GGUF file, or the model directory
    identity: str  # "<file name> sha256:<digest>"

    @property
    def digest(self) -> str:
        return self.identity.rsplit("sha256:", 1)[1]


@dataclass(frozen=True)
class ImportResult:
    candidate: Candidate
    alias: Path
    created: bool  # False: the source had been imported before
    seconds: float


def default_name(source: Path) -> str:
    """The alias name a source gets: its file or directory name, lower case, without a quantisation
    suffix (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``)."""
    stem = source.name[:-len(".gguf")] if source.name.lower().endswith(".gguf") else source.name
    stem = _QUANT_SUFFIX.sub("", stem).lower()
    return re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-.") or "model"


def _directory_digest(directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    listing = {str(p.relative_to(directory)): sha256_file(p) for p in files}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def inspect_source(path: Path, gguf_file: str | None = None) -> Source:
    """What ``path`` is (a GGUF file, a directory holding one, or a Hugging Face model directory) and
    its identity; anything else is a :class:`ModelImportError` naming the problem."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelImportError(f"{path}: no such file or directory")
    if path.is_file():
        if gguf_file:
            raise ModelImportError(f"{path} is a file: --gguf-file names a file inside a model directory")
        return _gguf_source(path.resolve())
    if gguf_file:
        return _gguf_source((path / gguf_file).resolve())
    if (path / "config.json").is_file():
        return _hf_source(path.resolve())
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_source(ggufs[0].resolve())
    if ggufs:
        raise ModelImportError(f"{path} holds several GGUF files ({', '.join(p.name for p in ggufs)}): "
                               "choose one with --gguf-file")
    if (path / "adapter_config.json").is_file():
        raise ModelImportError(f"{path} is a LoRA adapter, not a model: import its base model")
    raise ModelImportError(f"{path} is not a model directory (no config.json and no .gguf file)")


def _gguf_source(file: Path) -> Source:
    if not file.is_file():
        raise ModelImportError(f"{file}: no such GGUF file")
    with open(file, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelImportError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return Source("gguf", file, f"{file.name} sha256:{sha256_file(file)}")


def _hf_source(directory: Path) -> Source:
    names = [p.name for p in directory.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if Path(n).suffix in UNSAFE_SUFFIXES)
        if pickles:
            raise ModelImportError(f"{directory} holds only pickle-based weights ({', '.join(pickles[:3])}): they are "
                                   "never loaded (unpickling runs code); convert them to safetensors first")
        raise ModelImportError(f"{directory} has no .safetensors weights")
    if not {"tokenizer.json", "tokenizer_config.json"} & set(names):
        raise ModelImportError(f"{directory} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return Source("hf", directory, f"{directory.name} sha256:{_directory_digest(directory)}")


# --------------------------------------------------------------------------------------- loading
def _load_gguf(file: Path):
    """(model, tokenizer) from a GGUF file: dequantised to float32 and rebuilt as a plain model (one
    loaded from GGUF keeps a quantization config and refuses to be saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModelImportError("reading GGUF files needs the `gguf` package (pip install -e . installs it)")
    kwargs = dict(gguf_file=file.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model, tokenizer


def _load_hf(directory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=True, dtype="auto")
    return model, tokenizer


def _reload(path: Path):
    from sleep_pipeline.train.modeling import load_pretrained, load_tokenizer

    load_tokenizer(path)
    return load_pretrained(path)


# ---------------------------------------------------------------------------------------- import
def _imported_before(db_path: Path, source: Source) -> Candidate | None:
    """The candidate an earlier import of the same source made, when its files still verify."""
    for cand in reversed(list_candidates(db_path) if db_path.exists() else []):
        if cand.phase != PHASE or cand.base_model != source.identity or cand.status in GONE:
            continue
        if not Path(cand.path).is_dir():
            continue
        try:
            verify_checkpoint(Path(cand.path))
        except CheckpointError as exc:
            raise ModelImportError(f"{source.path.name} was imported before as candidate {cand.short}, whose files no "
                                   f"longer verify ({exc}); purge it (sleep-pipeline candidates purge {cand.short} "
                                   "--reason ...) and import again") from None
        return cand
    return None


def _set_alias(models_root: Path, name: str, target: Path) -> Path:
    """``models_root/name`` -> ``target`` as a relative symlink, replaced atomically."""
    alias = models_root / name
    if alias.exists() and not alias.is_symlink():
        raise ModelImportError(f"{alias} exists and is not an alias: choose another --name")
    tmp = models_root / f".alias-{name}-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(target, models_root), tmp)
    os.replace(tmp, alias)
    return alias


def import_model(path: Path, db_path: Path, models_root: Path, name: str | None = None,
                 gguf_file: str | None = None, log: Callable[[str], None] | None = None) -> ImportResult:
    """Import the model at ``path`` as a candidate in the registry at ``db_path``, its files under
    ``models_root/imported`` and its alias at ``models_root/<name>``. Nothing is left behind on failure."""
    say = log or (lambda _msg: None)
    started = time.monotonic()
    source = inspect_source(Path(path), gguf_file)
    name = (name or default_name(source.path)).lower()
    if not _NAME.match(name):
        raise ModelImportError(f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    models_root = Path(models_root).resolve()
    root = models_root / IMPORTED
    db_path = Path(db_path)

    existing = _imported_before(db_path, source)
    if existing is not None:
        alias = _set_alias(models_root, name, Path(existing.path))
        return ImportResult(existing, alias, False, time.monotonic() - started)

    final_name = f"{PHASE}-{name}-{source.digest[:12]}"
    final = root / final_name
    if final.is_dir():  # published by an import that stopped before registering it
        try:
            same = read_manifest(final).get("base_model") == source.identity
        except CheckpointError:
            same = False
        if not same:
            raise ModelImportError(f"{final} exists and is not an import of {source.path.name}: remove it or "
                                   "choose another --name")
        cand = register(db_path, final, PHASE)
        return ImportResult(cand, _set_alias(models_root, name, final), False, time.monotonic() - started)

    for stale in abandoned_staging(root):
        shutil.rmtree(stale, ignore_errors=True)
    say(f"reading {source.path} ({source.kind})")
    stage = staging_dir(root, final_name)
    try:
        try:
            model, tokenizer = _load_gguf(source.path) if source.kind == "gguf" else _load_hf(source.path)
        except ModelImportError:
            raise
        except Exception as exc:  # a corrupt or unsupported file fails in many ways inside the loaders
            detail = " ".join(str(exc).split())[:400] or type(exc).__name__
            what = ("a GGUF model (a corrupt or truncated file, or an architecture transformers cannot read)"
                    if source.kind == "gguf" else "a causal language model")
            raise ModelImportError(f"cannot load {source.path} as {what}: {detail}") from None
        parameters = sum(p.numel() for p in model.parameters())
        say(f"loaded {type(model).__name__} ({parameters:,} parameters, {model.dtype}); writing safetensors")
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        del model
        info = {
            "phase": PHASE, "kind": PHASE, "parents": [], "init_from": None, "data_version": None,
            "recipe_hash": None, "recipe": None, "base_model": source.identity,
            "source": str(source.path), "source_format": source.kind, "parameters": parameters,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        }
        try:
            final, _manifest = publish(stage, root, final_name, info, reload=_reload)
        except CheckpointError as exc:
            raise ModelImportError(str(exc)) from None
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    cand = register(db_path, final, PHASE)
    alias = _set_alias(models_root, name, final)
    say(f"published {final}")
    return ImportResult(cand, alias, True, time.monotonic() - started)
