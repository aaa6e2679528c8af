"""Deadlines of running benchmark runs, and the failure records of runs that ended without writing their own.

Shared by the process-pool runner (:mod:`vpeft.bench.runner`) and the Ray backend (:mod:`vpeft.bench.ray_backend`),
so neither imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vpeft.bench.definition import RunSpec
from vpeft.bench.records import environment, write_record

__all__ = ["Deadlines", "died_record", "failure_record", "log_tail", "timed_out_record", "timeout_error"]


def log_tail(out_dir: Path, n: int = 20) -> str:
    try:
        return "\n".join((out_dir / "log.txt").read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def died_record(spec: RunSpec, out_dir: Path, exitcode: int | None) -> dict[str, Any]:
    """The failure record of a worker that exited without writing one (crash, kill)."""
    why = f"signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    return failure_record(spec, out_dir, f"WorkerDied: the worker process ended with {why} before writing its record")


def timeout_error(elapsed_s: float, limit_s: float, source: str = "--run-timeout") -> str:
    """The ``error`` of a run stopped at its time limit; ``source`` names where the limit was set."""
    return f"RunTimeout: timed out after {elapsed_s:.0f} s (limit {source} {limit_s:g})"


def timed_out_record(spec: RunSpec, out_dir: Path, elapsed_s: float, limit_s: float, source: str) -> dict[str, Any]:
    """The failure record of a run stopped at its time limit (with the tail of its log)."""
    return failure_record(
        spec, out_dir, timeout_error(elapsed_s, limit_s, source), timed_out=True, run_timeout_s=limit_s
    )


def failure_record(spec: RunSpec, out_dir: Path, error: str, **extra: Any) -> dict[str, Any]:
    """Write and return the failure record of a run that did not write its own."""
    record = {
        **spec.record_fields(),
        "status": "failed",
        "error": error,
        **extra,
        "log_tail": log_tail(out_dir),
        "env": environment(spec.device),
    }
    write_record(out_dir / "record.json", record)
    return record


class Deadlines:
    """Start times of running runs against a wall-clock limit (``None``: no limit); keys are any hashables.

    Shared by the process pool and the Ray backend: :meth:`wait_s` bounds how long to wait for the next event,
    :meth:`overdue` lists the runs past the limit.
    """

    def __init__(self, limit_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s, self.clock = limit_s, clock
        self.started: dict[Any, float] = {}

    def start(self, key: Any) -> None:
        self.started[key] = self.clock()

    def stop(self, key: Any) -> float:
        """Forget ``key``; return how long it ran (0 if it was not started)."""
        start = self.started.pop(key, None)
        return 0.0 if start is None else self.clock() - start

    def overdue(self) -> list[Any]:
        if self.limit_s is None:
            return []
        now = self.clock()
        return [k for k, t in self.started.items() if now - t >= self.limit_s]

    def wait_s(self, longest: float) -> float:
        """Seconds until the next run is due (``longest`` at most, 0 if one is due already)."""
        if self.limit_s is None or not self.started:
            return longest
        due = min(self.started.values()) + self.limit_s - self.clock()
        return min(longest, max(due, 0.0))
