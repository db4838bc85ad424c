"""The checkpoint contract every phase (Learn, Compress, Dream) writes and every consumer trusts.

A checkpoint is a directory of safetensors weights plus tokenizer/config files and a
``manifest.json`` holding the sha256 and size of every file and the facts of how it was made. It is
written into a hidden staging directory beside its final place, verified (hashes and a real reload)
and only then renamed into place, so a directory without a verified manifest is never a checkpoint.
Pickle-based weight files (``.bin``, ``.pt``, ``.pkl``) are refused: loading them runs arbitrary code.

Two digests: ``checkpoint_sha256`` covers the files (the content: two checkpoints with the same
weights, tokenizer and config have the same one, and it is a candidate's id), ``manifest_sha256``
covers everything else the manifest says (lineage: phase, parents, data version, recipe, base model,
created_at), so editing a lineage field is detected like editing a weight. Which checkpoints may be
deleted is decided by the candidate registry (:mod:`sleep_pipeline.candidates`), not here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from sleep_pipeline.fsio import write_atomic

MANIFEST = "manifest.json"
CARD = "README.md"  # the model card beside the weights; documentation, not part of the digest
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(RuntimeError):
    """A directory is not a complete, verified checkpoint."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    """The files the digest covers: everything but the manifest and the model card (README.md at the
    top, rewritten when the gate decides and again on release)."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST and p.relative_to(directory) != Path(CARD))


def checkpoint_sha256(manifest: dict) -> str:
    """One digest for the whole checkpoint: the hash of its sorted file hashes."""
    blob = json.dumps({k: v["sha256"] for k, v in sorted(manifest["files"].items())}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """The digest of every manifest field but itself: the lineage cannot be edited unnoticed."""
    blob = json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_manifest(directory: Path, info: dict[str, Any]) -> dict:
    """Hash every file under ``directory`` and write the manifest (``info`` holds the lineage)."""
    directory = Path(directory)
    unsafe = [p.name for p in _files(directory) if p.suffix in UNSAFE_SUFFIXES]
    if unsafe:
        raise CheckpointError(f"{directory}: pickle-based files are not allowed in a checkpoint: {unsafe}")
    files = {str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _files(directory)}
    if not any(name.endswith(".safetensors") for name in files):
        raise CheckpointError(f"{directory}: no .safetensors weights to publish")
    manifest = {
        **info,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
        "files": files,
    }
    manifest["checkpoint_sha256"] = checkpoint_sha256(manifest)
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{directory}: no {MANIFEST} (an incomplete or foreign directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable manifest: {exc}") from exc


def verify_checkpoint(directory: Path, reload: Callable[[Path], Any] | None = None) -> dict:
    """Check every file against the manifest (none missing, none extra, none altered), refuse pickle
    files, then optionally ``reload`` the directory (e.g. ``from_pretrained``). Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    present = {str(p.relative_to(directory)) for p in _files(directory)}
    expected = set(manifest.get("files", {}))
    if present != expected:
        raise CheckpointError(
            f"{directory}: files differ from the manifest (missing {sorted(expected - present)}, extra {sorted(present - expected)})"
        )
    for name in sorted(present):
        if Path(name).suffix in UNSAFE_SUFFIXES:
            raise CheckpointError(f"{directory}: pickle-based file {name} refused")
        if sha256_file(directory / name) != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"{directory}: {name} does not match its sha256 in the manifest")
    if manifest.get("checkpoint_sha256") != checkpoint_sha256(manifest):
        raise CheckpointError(f"{directory}: manifest digest does not match its file list")
    if manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise CheckpointError(f"{directory}: the manifest was edited after it was written (its lineage fields "
                              "do not match manifest_sha256)")
    if reload is not None:
        try:
            reload(directory)
        except Exception as exc:  # any loader failure means the checkpoint is unusable
            raise CheckpointError(f"{directory}: does not reload: {exc}") from exc
    return manifest


STAGING = ".staging-"
STALE_STAGING_S = 24 * 3600  # a staging directory of another machine is left alone for this long


def staging_dir(root: Path, name: str) -> Path:
    """A fresh hidden directory beside the final place (same filesystem, so the rename is atomic). Its
    name records the writing host and process, so cleanup can tell an abandoned one from one in use."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")[:32]
    path = root / f"{STAGING}{name}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandoned_staging(root: Path, now: float | None = None) -> list[Path]:
    """Staging directories whose writer is gone: written on this host by a process that no longer runs,
    or (another host, or a name without a writer) untouched for ``STALE_STAGING_S``."""
    now = time.time() if now is None else now
    host = socket.gethostname().replace("-", "_")[:32]
    out = []
    for p in sorted(Path(root).glob(f"{STAGING}*")) if Path(root).exists() else []:
        parts = p.name.rsplit("-", 3)
        try:
            mine = len(parts) == 4 and parts[1] == host
            if mine and not pid_alive(int(parts[2])):
                out.append(p)
            elif not mine and now - p.stat().st_mtime > STALE_STAGING_S:
                out.append(p)
        except (ValueError, OSError):
            continue
    return out


def publish(staging: Path, root: Path, name: str, info: dict,
            reload: Callable[[Path], Any] | None = None) -> tuple[Path, dict]:
    """Write the manifest into ``staging``, verify it, rename it to ``root/name``. Nothing is deleted
    here: retention is the candidate registry's job (it knows what is live, released or being gated)."""
    staging, root = Path(staging), Path(root)
    write_manifest(staging, {**info, "name": name})
    manifest = verify_checkpoint(staging, reload)
    final = root / name
    if final.exists():
        raise CheckpointError(f"{final} already exists; checkpoints are never overwritten")
    os.replace(staging, final)
    return final, manifest


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints (a manifest present, not staging), oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists():
            try:
                found.append((read_manifest(p).get("created_at", ""), p.name, p))
            except CheckpointError:
                continue
    return [p for _, _, p in sorted(found)]


def remove_checkpoint(path: Path) -> None:
    """Delete a published checkpoint: renamed aside first (one atomic step), so a crash midway leaves a
    hidden directory, never a half-deleted one that still looks published."""
    path = Path(path)
    aside = path.parent / f".deleting-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest published checkpoint under ``root`` (for reports and benchmarks; pipeline stages
    pass candidates by id instead)."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None
