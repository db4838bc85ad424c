"""Progress lines for long work: ``stage: 40,000/100,000 (40%) 12,345/s eta 4.9s``.

The engine never imports Dagster, so long stages take a ``log`` callable. The Dagster layer passes
``context.log.info`` (the lines land in the run log); the CLI and benchmarks pass ``print`` to stderr.
Lines are rate-limited so a tight loop can call :meth:`Progress.update` freely.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

LogFn = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, stage: str, total: int, log: LogFn | None = stderr_log, every_s: float = 2.0):
        self.stage = stage
        self.total = max(int(total), 0)
        self.log = log
        self.every_s = every_s
        self.start = time.perf_counter()
        self.last = 0.0
        self.done = 0
        self._logged_done = -1

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        if self.log is None or (done == self._logged_done and done > 0):
            return
        now = time.perf_counter()
        if not force and now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        self._logged_done = done
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = f"eta {(self.total - done) / rate:.1f}s" if rate > 0 and done < self.total else f"in {elapsed:.1f}s"
        self.log(f"{self.stage}: {done:,}/{self.total:,} ({pct:.0f}%) {rate:,.0f}/s {eta}")

    def finish(self) -> float:
        """Log the final line and return the elapsed seconds."""
        self.update(self.total, force=True)
        return time.perf_counter() - self.start
