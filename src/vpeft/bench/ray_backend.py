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
        gpus = 1 if todo and todo[0].device.startswith("cuda") else 0
        remote = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(task)
        refs, by_id = {}, {}
        for spec in todo:
            rdir = run_dir(out, spec.method_label, spec.task, spec.seed)
            (rdir / "record.json").unlink(missing_ok=True)  # an old failure must not stand in for this attempt
            ref = remote.remote(spec.to_dict(), str(rdir.resolve()), threads, started)
            refs[ref], by_id[spec.run_id] = spec, ref
        pending, records = list(refs), []
        deadlines = Deadlines(run_timeout_s)
        for spec in todo[:workers]:  # Ray does not say when a task starts: count `workers` of them as running
            progress.started(spec.run_id, announce=False)
        shown = min(workers, len(todo))

        def finished(ref, rec: dict[str, Any]) -> None:
            nonlocal shown
            records.append(rec)
            progress.finished(refs[ref].run_id, rec)
            if shown < len(todo):
                progress.started(todo[shown].run_id, announce=False)
                shown += 1

        while pending:
            poll = 30.0 if started is None else 1.0
            done, pending = ray.wait(pending, num_returns=1, timeout=deadlines.wait_s(poll))
            for ref in done:
                deadlines.stop(ref)
                spec = refs[ref]
                try:
                    rec = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, node loss
                    rec = _lost(spec, exc)
                path = run_dir(out, spec.method_label, spec.task, spec.seed) / "record.json"
                if read_record(path) is None or rec["status"] != "ok":
                    write_record(path, {k: v for k, v in rec.items() if k != "schema"})
                finished(ref, rec)
            if started is None:
                continue
            waiting = set(pending)
            for run_id in _drain(started):
                if by_id.get(run_id) in waiting:
                    deadlines.start(by_id[run_id])
            for ref in deadlines.overdue():
                if ray.wait([ref], timeout=0)[0]:
                    continue  # finished just now: collected normally on the next turn
                elapsed = deadlines.stop(ref)
                spec = refs[ref]
                logger.warning("%s: no result after %.0f s: cancelling its Ray task", spec.run_id, elapsed)
                ray.cancel(ref, force=True)
                pending.remove(ref)
                rdir = run_dir(out, spec.method_label, spec.task, spec.seed)
                finished(ref, timed_out_record(spec, rdir, elapsed, run_timeout_s, timeout_source))
        return records
    finally:
        if started is not None and not started_here:
            started.shutdown(force=True)
        if started_here:
            ray.shutdown()


def _drain(queue: Any) -> list[str]:
    """Everything on a Ray queue now, without blocking."""
    n = queue.qsize()
    return list(queue.get_nowait_batch(n)) if n else []
