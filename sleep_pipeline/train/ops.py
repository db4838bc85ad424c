"""DeepSpeed's JIT-built ops: one build per environment, and no launch left waiting on a dead builder.

On the CPU accelerator every rank JIT-loads DeepSpeed's ``deepspeed_shm_comm`` op through
``torch.utils.cpp_extension``. Two problems come with that:

* torch serialises loads with a plain lock file (``<build dir>/lock``, created and deleted by hand).
  A rank killed while it holds the file -- even during the quick up-to-date check of an already
  built op -- leaves it behind, and every later launch waits on it forever.
* the build directory is shared by every virtual environment of the same Python
  (``~/.cache/torch_extensions/py311_cpu``), and a build from another environment has other include
  paths, so two checkouts rebuild the op over each other (minutes each) and wait on each other's lock.

So the worker gives each environment its own build root (unless ``TORCH_EXTENSIONS_DIR`` is set) and
loads the op itself before DeepSpeed asks for it, holding an ``flock`` on a file in that root. The
kernel drops an ``flock`` when its holder dies, however it dies; every loader of ours takes it first,
so a torch lock file found while holding it was left by a dead process and is removed. DeepSpeed
then finds the op already loaded in the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

STALE_LOCK_S = 900
OP_NAME = "deepspeed_shm_comm"
DEFAULT_ROOT = Path.home() / ".cache" / "torch_extensions"  # torch's own default build root


def extensions_root() -> Path:
    """Where torch builds extensions for this process: ``TORCH_EXTENSIONS_DIR`` or torch's default."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(explicit) if explicit else DEFAULT_ROOT


def use_environment_build_root() -> Path:
    """Point torch at a build root of this virtual environment's own, unless the user chose one."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        env_id = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(DEFAULT_ROOT / f"env-{env_id}")
    return extensions_root()


def _build_dirs(name: str) -> list[Path]:
    """Build directories of op ``name`` (``*`` for all): torch uses ``ROOT/NAME`` under an explicit
    ``TORCH_EXTENSIONS_DIR`` and ``ROOT/py311_cpu/NAME`` under its default root."""
    root = extensions_root()
    if not root.exists():
        return []
    return [p for p in [*root.glob(name), *root.glob(f"*/{name}")] if p.is_dir()]


def clear_stale_extension_locks(max_age_s: float = STALE_LOCK_S, name: str = "*") -> list[Path]:
    """Remove torch-extension build locks older than ``max_age_s`` (a real build takes minutes)."""
    removed = []
    for lock in [d / "lock" for d in _build_dirs(name) if (d / "lock").is_file()]:
        try:
            if time.time() - lock.stat().st_mtime >= max_age_s:
                lock.unlink()
                removed.append(lock)
                print(f"removed a stale build lock {lock}", file=sys.stderr, flush=True)
        except FileNotFoundError:
            pass
    return removed


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def preload_cpu_ops(say=print) -> bool:
    """Load DeepSpeed's CPU communication op under our own lock; returns False when DeepSpeed has no
    such op for this machine (it then all-reduces through gloo alone)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    root = extensions_root()
    start = time.monotonic()
    with _flock(root / ".sleep_pipeline-ops.lock"):
        clear_stale_extension_locks(max_age_s=0, name=builder.NAME)  # its holder is dead: we hold the flock
        built = any((d / f"{builder.NAME}.so").exists() for d in _build_dirs(builder.NAME))
        if not built:
            say(f"building DeepSpeed's {builder.NAME} op in {root} (once per environment; takes minutes)")
        builder.load(verbose=False)
    if not built:
        say(f"built {builder.NAME} in {time.monotonic() - start:.0f}s")
    return True
