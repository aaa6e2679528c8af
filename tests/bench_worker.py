"""A worker entry point for the process-pool test of vpeft bench (kept light: the crashing worker imports nothing)."""

from __future__ import annotations

import os


def crash_or_run(spec: dict, out_dir: str, threads: int, verbose: bool) -> None:
    """The run labelled 'crash' dies hard (like a segfault or an OOM kill); the others run normally."""
    if spec["method_label"] == "crash":
        os._exit(3)
    from vpeft.bench.runner import _worker_main

    _worker_main(spec, out_dir, threads, verbose)
