"""What every benchmark in ``bench/`` shares: the ``--smoke`` switch, and a stdout that holds only the
JSON report, which records how busy the machine was.

``--smoke`` runs the same code paths at tiny sizes with one repeat, so the test suite can run every
benchmark and a broken one fails CI. Its figures measure nothing; the JSON says ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

SMOKE_HELP = "tiny sizes and one repeat: checks that the benchmark runs (the test suite uses it); measures nothing"


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, smoke_defaults: dict) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke`` the defaults become ``smoke_defaults`` (explicit options still win)."""
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = ap.parse_args(argv)
    if args.smoke:
        ap.set_defaults(**smoke_defaults)
        args = ap.parse_args(argv)
    return args


def json_stdout() -> Callable[[dict], None]:
    """Keep stdout for the report alone: from now on whatever is written to file descriptor 1 (library
    warnings such as DeepSpeed's accelerator notice, launched processes) goes to stderr. Returns the
    function that prints the report on the real stdout, with ``machine``: the core count and the
    1-minute load average now and when the measurement started. A load well above the cores means
    other work shared them and the figures are not comparable (two-thread torch sides suffer most:
    their threads wait on each other)."""
    load_at_start = os.getloadavg()[0]
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def emit(report: dict) -> None:
        machine = {"cpus": os.cpu_count(), "load_average_1min": [round(load_at_start, 2), round(os.getloadavg()[0], 2)]}
        out.write(json.dumps({**report, "machine": machine}, indent=2) + "\n")
        out.flush()

    return emit
