"""DeepSpeed's CPU shared-memory all-reduce buffers: released as soon as every rank has them.

On the CPU accelerator, DeepSpeed's ``shm_comm`` op gives every rank a 66 MB POSIX shared-memory
segment, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never
unlinks it: each launch leaves ``world_size`` segments behind, and ``/dev/shm`` is RAM. A few hundred
launches fill the machine's memory.

The fix has three parts:

* :func:`release_run_segments` -- rank 0 calls it once every rank has mapped every peer's segment
  (after a barrier past DeepSpeed's communication set-up). Unlinking only removes the names; the
  mappings live on until the ranks exit, however they exit (SIGKILL included), and the kernel frees
  the memory then.
* the launching process calls it again once the launcher has exited, for a run that died before
  reaching that point.
* :func:`sweep_stale_segments` -- before a launch, segments of this user that no live process maps
  and that are older than a minute (a run's own segments are mapped right after they are written) are
  removed: what older versions, or a machine-wide kill, left behind.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"
STALE_AFTER_S = 60.0
SEGMENT_BYTES = 69_206_024  # sizeof(struct allreduce_workspace) in DeepSpeed 0.19.8's shm.cpp


class SharedMemoryFull(RuntimeError):
    pass


def check_room(local_ranks: int, shm_dir: Path = SHM_DIR, segment_bytes: int = SEGMENT_BYTES) -> None:
    """Fail with a clear message when ``shm_dir`` cannot hold one buffer per local rank.

    Without room DeepSpeed does not fail cleanly: a short write leaves a segment that crashes the
    rank mapping it (SIGBUS), or its peers wait forever for a segment that never appears."""
    if not shm_dir.is_dir():
        return
    free = shutil.disk_usage(shm_dir).free
    need = local_ranks * segment_bytes
    if free < need:
        raise SharedMemoryFull(
            f"{shm_dir} has {free / 2**20:,.0f} MiB free; DeepSpeed's CPU all-reduce needs {local_ranks} x "
            f"{segment_bytes / 2**20:,.0f} MiB there. Free it (`ls -la {shm_dir}`) or give the machine more "
            "shared memory (`mount -o remount,size=... /dev/shm`; in a container, `--shm-size`).")


def _own_prefix() -> str:
    return f"{PREFIX}_{os.getuid()}_"


def run_segments(addr: str | None = None, port: str | int | None = None, shm_dir: Path = SHM_DIR) -> list[Path]:
    """This user's segments of the run rendezvousing at ``addr:port`` (from the environment by default)."""
    addr = addr if addr is not None else os.environ.get("MASTER_ADDR", "")
    port = port if port is not None else os.environ.get("MASTER_PORT", "")
    if not shm_dir.is_dir():
        return []
    addr = addr if addr == "*" else glob.escape(addr)
    return sorted(shm_dir.glob(f"{_own_prefix()}{addr}_{glob.escape(str(port))}_*"))


def release_run_segments(addr: str | None = None, port: str | int | None = None, shm_dir: Path = SHM_DIR) -> int:
    """Unlink the segment names of one run; returns how many were removed."""
    removed = 0
    for path in run_segments(addr, port, shm_dir):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass  # already gone (the ranks released it before the launcher exited)
    return removed


def mapped_paths(shm_dir: Path = SHM_DIR) -> set[str]:
    """Files under the shared-memory directory that some process we can inspect has mapped."""
    mapped: set[str] = set()
    needle = os.fsencode(str(shm_dir) + "/")
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            data = maps.read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        for line in data.splitlines():
            idx = line.find(needle)
            if idx >= 0:
                mapped.add(os.fsdecode(line[idx:].removesuffix(b" (deleted)")))
    return mapped


def sweep_stale_segments(shm_dir: Path = SHM_DIR, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove this user's all-reduce segments that no live process maps and that are not brand new."""
    if not shm_dir.is_dir():
        return []
    candidates = list(shm_dir.glob(f"{_own_prefix()}*"))
    if not candidates:
        return []
    mapped = mapped_paths(shm_dir)
    now = time.time()
    removed, freed = [], 0
    for path in candidates:
        try:
            stat = path.stat()
            if str(path) in mapped or now - stat.st_mtime < stale_after_s:
                continue
            path.unlink()
        except OSError:
            continue  # gone meanwhile, or not ours to remove: this is best-effort housekeeping
        removed.append(path)
        freed += stat.st_size
    if removed:
        print(f"removed {len(removed)} stale DeepSpeed shared-memory buffers from {shm_dir} "
              f"({freed / 2**20:,.0f} MiB)", file=sys.stderr, flush=True)
    return removed
