"""Run a benchmark grid on Ray: one Ray task per (method, task, seed), each writing its own record.

``vpeft bench DEF --out DIR --ray ADDRESS`` connects to a running cluster (``ray start --head`` on the head node;
``DIR`` should then be on a filesystem every node sees); ``--ray`` without an address starts a local Ray with
``workers x threads`` CPUs. Each task reserves ``threads`` CPUs (plus one GPU per task on a ``cuda`` device) and
calls the same :func:`vpeft.bench.protocol.run_and_record` as the local pool. The record also travels back to the
driver, which writes it into ``DIR`` if the task's node could not (no shared filesystem); a task that dies (node
lost, worker killed) gets a failure record, and the other tasks go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vpeft.bench.definition import RunSpec
from vpeft.bench.records import environment, read_record, run_dir, write_record
from vpeft.errors import ConfigError

__all__ = ["run_ray"]

logger = logging.getLogger(__name__)


def _ray_task(spec_dict: dict[str, Any], out_dir: str, threads: int) -> dict[str, Any]:
    """Body of one Ray task (runs on a Ray worker)."""
    import torch

    from vpeft.bench.protocol import run_and_record

    torch.set_num_threads(threads)
    return run_and_record(RunSpec.from_dict(spec_dict), out_dir)


def _lost(spec: RunSpec, error: BaseException) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "method": spec.method_label,
        "method_name": spec.method_name,
        "task": spec.task,
        "group": spec.group,
        "seed": spec.seed,
        "definition": spec.definition,
        "fingerprint": spec.fingerprint(),
        "spec": spec.to_dict(),
        "status": "failed",
        "error": f"RayTaskFailed: {type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}",
        "env": environment(spec.device),
    }


def run_ray(
    todo: Sequence[RunSpec], out: Path, address: str | None, workers: int, threads: int, progress
) -> list[dict[str, Any]]:
    """Submit every run as a Ray task and collect the records as they finish (see the module docstring)."""
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
    try:
        gpus = 1 if todo and todo[0].device.startswith("cuda") else 0
        remote = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(_ray_task)
        refs = {}
        for spec in todo:
            rdir = run_dir(out, spec.method_label, spec.task, spec.seed)
            (rdir / "record.json").unlink(missing_ok=True)  # an old failure must not stand in for this attempt
            refs[remote.remote(spec.to_dict(), str(rdir.resolve()), threads)] = spec
        pending, records = list(refs), []
        for spec in todo[:workers]:  # Ray does not say when a task starts: count `workers` of them as running
            progress.started(spec.run_id, announce=False)
        shown = min(workers, len(todo))
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=30.0)
            for ref in done:
                spec = refs[ref]
                try:
                    rec = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, node loss
                    rec = _lost(spec, exc)
                path = run_dir(out, spec.method_label, spec.task, spec.seed) / "record.json"
                if read_record(path) is None or rec["status"] != "ok":
                    write_record(path, {k: v for k, v in rec.items() if k != "schema"})
                records.append(rec)
                progress.finished(spec.run_id, rec)
                if shown < len(todo):
                    progress.started(todo[shown].run_id, announce=False)
                    shown += 1
        return records
    finally:
        if started_here:
            ray.shutdown()
