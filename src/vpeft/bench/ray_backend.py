"""Run a benchmark grid on Ray: one Ray task per (method, task, seed), each writing its own record.

``vpeft bench DEF --out DIR --ray ADDRESS`` connects to a running cluster (``ray start --head`` on the head node;
``DIR`` should then be on a filesystem every node sees); ``--ray`` without an address starts a local Ray with
``workers x threads`` CPUs. Each task reserves ``threads`` CPUs (plus one GPU per task on a ``cuda`` device) and
calls the same :func:`vpeft.bench.protocol.run_and_record` as the local pool. The record also travels back to the
driver, which writes it into ``DIR`` if the task's node could not (no shared filesystem); a task that dies (node
lost, worker killed) gets a failure record, and the other tasks go on.

With a per-run time limit, each task reports its start on a small queue actor (Ray does not tell the driver when
a queued task starts), and the driver force-cancels a task still running ``run_timeout_s`` after its start
(``ray.cancel(force=True)`` kills the Ray worker running it) and records the same ``RunTimeout`` failure as the
local pool. Start times are polled once a second, so a run may overrun by about a second.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vpeft.bench.deadlines import Deadlines, timed_out_record
from vpeft.bench.definition import RunSpec
from vpeft.bench.records import environment, read_record, run_dir, write_record
from vpeft.errors import ConfigError

__all__ = ["run_ray"]

logger = logging.getLogger(__name__)


def _ray_task(spec_dict: dict[str, Any], out_dir: str, threads: int, started: Any = None) -> dict[str, Any]:
    """Body of one Ray task (runs on a Ray worker); puts the run's id on the ``started`` queue first, if given."""
    import torch

    from vpeft.bench.protocol import run_and_record

    _announce(started, spec_dict)
    torch.set_num_threads(threads)
    return run_and_record(RunSpec.from_dict(spec_dict), out_dir)


def _announce(started: Any, spec_dict: dict[str, Any]) -> None:
    """Tell the driver (through the ``started`` queue actor) that this run has started."""
    if started is None:
        return
    try:
        started.put_nowait(RunSpec.from_dict(spec_dict).run_id)
    except Exception as exc:  # noqa: BLE001 - a lost notice only delays the time limit, it must not fail the run
        logger.warning("could not report the start of %s: %s", spec_dict.get("method_label"), exc)


def _lost(spec: RunSpec, error: BaseException) -> dict[str, Any]:
    return {
        **spec.record_fields(),
        "status": "failed",
        "error": f"RayTaskFailed: {type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}",
        "env": environment(spec.device),
    }


def run_ray(
    todo: Sequence[RunSpec],
    out: Path,
    address: str | None,
    workers: int,
    threads: int,
    progress,
    run_timeout_s: float | None = None,
    timeout_source: str = "--run-timeout",
    task: Callable[..., dict[str, Any]] = _ray_task,
) -> list[dict[str, Any]]:
    """Submit every run as a Ray task and collect the records as they finish (see the module docstring).

    ``run_timeout_s`` limits each run's wall-clock time from its start; ``task`` is the task body (tests).
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'ray>=2.9'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers * threads, **kwargs)
    started = None
    try:
        if run_timeout_s is not None:
            from ray.util.queue import Queue

            started = Queue(actor_options={"num_cpus": 0})  # 0: the actor must not take a run's CPU slot
        runs = _RayRuns(ray, todo, out, workers, progress, Deadlines(run_timeout_s))
        runs.submit(task, threads, started)
        while runs.pending:
            runs.collect(poll_s=30.0 if started is None else 1.0)
            if started is not None:
                runs.cancel_overdue(started, run_timeout_s, timeout_source)  # type: ignore[arg-type]
        return runs.records
    finally:
        if started is not None and not started_here:
            started.shutdown(force=True)
        if started_here:
            ray.shutdown()


class _RayRuns:
    """The driver's view of the submitted runs: pending Ray refs, collected records, progress and deadlines."""

    def __init__(self, ray: Any, todo: Sequence[RunSpec], out: Path, workers: int, progress, deadlines: Deadlines):
        self.ray, self.todo, self.out, self.workers, self.progress = ray, todo, out, workers, progress
        self.deadlines = deadlines
        self.specs: dict[Any, RunSpec] = {}
        self.by_id: dict[str, Any] = {}
        self.pending: list[Any] = []
        self.records: list[dict[str, Any]] = []
        self.shown = 0

    def _dir(self, spec: RunSpec) -> Path:
        return run_dir(self.out, spec.method_label, spec.task, spec.seed)

    def submit(self, task: Callable[..., dict[str, Any]], threads: int, started: Any) -> None:
        gpus = 1 if self.todo and self.todo[0].device.startswith("cuda") else 0
        remote = self.ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(task)
        for spec in self.todo:
            rdir = self._dir(spec)
            (rdir / "record.json").unlink(missing_ok=True)  # an old failure must not stand in for this attempt
            ref = remote.remote(spec.to_dict(), str(rdir.resolve()), threads, started)
            self.specs[ref], self.by_id[spec.run_id] = spec, ref
        self.pending = list(self.specs)
        for spec in self.todo[: self.workers]:  # Ray does not say when a task starts: count `workers` as running
            self.progress.started(spec.run_id, announce=False)
        self.shown = min(self.workers, len(self.todo))

    def _finished(self, ref: Any, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        self.progress.finished(self.specs[ref].run_id, rec)
        if self.shown < len(self.todo):
            self.progress.started(self.todo[self.shown].run_id, announce=False)
            self.shown += 1

    def collect(self, poll_s: float) -> None:
        """Wait up to ``poll_s`` (or the next deadline) for one run; record what finished."""
        done, self.pending = self.ray.wait(self.pending, num_returns=1, timeout=self.deadlines.wait_s(poll_s))
        for ref in done:
            self.deadlines.stop(ref)
            spec = self.specs[ref]
            try:
                rec = self.ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, node loss
                rec = _lost(spec, exc)
            path = self._dir(spec) / "record.json"
            if read_record(path) is None or rec["status"] != "ok":  # the node could not write it, or it failed
                write_record(path, {k: v for k, v in rec.items() if k != "schema"})
            self._finished(ref, rec)

    def cancel_overdue(self, started: Any, limit_s: float, source: str) -> None:
        """Start the clocks of runs that announced their start; force-cancel those past ``limit_s``."""
        waiting = set(self.pending)
        for run_id in _drain(started):
            if self.by_id.get(run_id) in waiting:
                self.deadlines.start(self.by_id[run_id])
        for ref in self.deadlines.overdue():
            if self.ray.wait([ref], timeout=0)[0]:
                continue  # finished just now: collected normally on the next turn
            elapsed = self.deadlines.stop(ref)
            spec = self.specs[ref]
            logger.warning("%s: no result after %.0f s: cancelling its Ray task", spec.run_id, elapsed)
            self.ray.cancel(ref, force=True)
            self.pending.remove(ref)
            self._finished(ref, timed_out_record(spec, self._dir(spec), elapsed, limit_s, source))


def _drain(queue: Any) -> list[str]:
    """Everything on a Ray queue now, without blocking."""
    n = queue.qsize()
    return list(queue.get_nowait_batch(n)) if n else []
