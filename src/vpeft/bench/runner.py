"""Run a benchmark grid: plan (resume), prepare data, execute runs in a local process pool, show progress.

Every run executes in its own fresh worker process (``spawn``), at most ``workers`` at a time, each with
``threads`` torch threads (``workers x threads <= cores``). A fresh process per run isolates failures (a crash,
an out-of-memory kill) and makes the RSS-based peak memory of one run independent of the others. The worker
writes the run's record itself; if it dies without one, the parent records the failure. ``workers=0`` runs
everything in the calling process (debugging, tests).

A per-run wall-clock limit (``run_timeout_s``, ``vpeft bench --run-timeout``) stops a hung or runaway run: each
worker makes itself a process group, and a worker past the limit gets SIGTERM, then SIGKILL after
:data:`KILL_GRACE_S`, sent to the whole group (its data-loader workers and other children too). The run gets a
failure record (``RunTimeout: timed out after ...`` and the tail of its log) and the other runs go on. In-process
runs (``workers=0``) cannot be stopped, so there the limit is refused when given explicitly (and ignored, with a
warning, when it only comes from the definition).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, TextIO

from vpeft.bench.deadlines import Deadlines, died_record, timed_out_record, timeout_error
from vpeft.bench.definition import BenchDefinition, RunSpec, check_run_timeout
from vpeft.bench.protocol import ensure_task, run_and_record
from vpeft.bench.records import (
    cpu_count,
    read_record,
    record_path,
    results_lock,
    run_dir,
)
from vpeft.bench.report import METRIC_NAMES
from vpeft.errors import ConfigError, DataError
from vpeft.train.metrics import write_json_atomic

__all__ = [
    "BenchSummary",
    "Deadlines",
    "Progress",
    "default_parallelism",
    "die_with_parent",
    "plan_runs",
    "prepare_tasks",
    "run_bench",
    "timeout_error",
]

logger = logging.getLogger(__name__)

KILL_GRACE_S = 10.0
"""Seconds between SIGTERM and SIGKILL when a run is stopped (time limit, interrupted grid)."""


def default_parallelism(workers: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """``(workers, torch threads per worker)`` with ``workers * threads <= cores``.

    Default: one worker per 4 cores (at least one), the cores shared out evenly between the workers.
    """
    cores = cpu_count()
    if workers is None:
        workers = max(1, cores // 4)
    if threads is None:
        threads = max(1, cores // max(workers, 1))
    return workers, threads


@dataclass
class BenchSummary:
    """What a :func:`run_bench` call did."""

    out_dir: Path
    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)


def resolve_roots(definition: BenchDefinition, data_root: str | os.PathLike | None = None) -> BenchDefinition:
    """Fix the data roots once, in the parent: ``data_root`` (else the definition's, else
    :func:`vpeft.data.default_data_root`) and the generated tasks' root (else :func:`vpeft.run.cache_data_root`)."""
    from vpeft.data import default_data_root
    from vpeft.run import cache_data_root

    root = data_root if data_root is not None else definition.data_root or default_data_root()
    gen = definition.generated_root or cache_data_root()
    return dataclasses.replace(definition, data_root=str(Path(root).expanduser().resolve()), generated_root=str(gen))


# ---- planning -----------------------------------------------------------------------------------------------------
def plan_runs(runs: Sequence[RunSpec], out_dir: str | os.PathLike) -> tuple[list[RunSpec], list[RunSpec]]:
    """Split runs into ``(to_do, finished)``: a run is finished if its record says ``ok`` for the same spec.

    A record with another fingerprint (the definition changed) is removed and its run redone; failed runs are
    retried.
    """
    todo, done = [], []
    for spec in runs:
        path = record_path(out_dir, spec.method_label, spec.task, spec.seed)
        rec = read_record(path)
        if rec is not None and rec.get("status") == "ok" and rec.get("fingerprint") == spec.fingerprint():
            done.append(spec)
            continue
        if rec is not None and rec.get("fingerprint") != spec.fingerprint():
            logger.warning("%s: the record was made by another definition of this run; redoing it", spec.run_id)
            path.unlink(missing_ok=True)
        todo.append(spec)
    return todo, done


def prepare_tasks(runs: Sequence[RunSpec]) -> None:
    """Generate the generated tasks once, up front, and check every other task folder exists.

    Raises:
        DataError: Missing task folders (all of them named, with where they were looked for).
    """
    from vpeft.data import default_data_root

    seen, missing = set(), []
    for spec in runs:
        key = (spec.task, spec.data_root, spec.generate)
        if key in seen:
            continue
        seen.add(key)
        if spec.generate is not None:
            ensure_task(spec)
            continue
        root = Path(spec.data_root) if spec.data_root else default_data_root()
        if not (root / spec.task).is_dir():
            missing.append(f"{spec.task} (looked in {root})")
    if missing:
        raise DataError(
            f"task folder(s) not found: {'; '.join(missing)}. Pass --data-root / set VPEFT_DATA, fix the definition, "
            "or leave these tasks out with --tasks"
        )


# ---- progress -----------------------------------------------------------------------------------------------------
class Progress:
    """One line per event: ``[bench 3/16] done 3 | running 1 | failed 0 | ETA 5m20s | <what happened>``."""

    def __init__(self, total: int, workers: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.workers, self.stream, self.enabled = total, max(workers, 1), stream or sys.stderr, enabled
        self.done = self.failed = 0
        self.running: dict[str, float] = {}
        self.durations: list[float] = []
        self.start = time.monotonic()

    def started(self, run_id: str, announce: bool = True) -> None:
        self.running[run_id] = time.monotonic()
        if announce:
            self._line(f"started {run_id}")

    def finished(self, run_id: str, record: dict[str, Any]) -> None:
        now = time.monotonic()
        if run_id in self.running:
            self.durations.append(now - self.running.pop(run_id))
        else:  # a backend that cannot see when a run starts (Ray): free the oldest slot, use the run's own timing
            if self.running:
                self.running.pop(next(iter(self.running)))
            self.durations.append(float(record.get("duration_s") or 0.0))
        if record.get("status") == "ok":
            self.done += 1
            metric = METRIC_NAMES.get(record.get("primary_metric", "top1"), "score")
            score = 100 * record.get("score", record["top1"])
            self._line(f"ok {run_id}: {metric} {score:.2f}% ({self.durations[-1]:.0f} s)")
        else:
            self.failed += 1
            self._line(f"FAILED {run_id}: {record.get('error', 'unknown error')}")

    def eta_s(self) -> float | None:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        pending = self.total - self.done - self.failed - len(self.running)
        now = time.monotonic()
        left = pending * mean + sum(max(mean - (now - t), 0.0) for t in self.running.values())
        return left / self.workers

    def _line(self, what: str) -> None:
        if not self.enabled:
            return
        eta = self.eta_s()
        n = self.done + self.failed
        elapsed = _fmt_s(time.monotonic() - self.start)
        self.stream.write(
            f"[bench {n}/{self.total}] done {self.done} | running {len(self.running)} | failed {self.failed} | "
            f"elapsed {elapsed} | ETA {_fmt_s(eta) if eta is not None else '?'} | {what}\n"
        )
        self.stream.flush()


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ---- workers ------------------------------------------------------------------------------------------------------
def _worker_main(spec_dict: dict[str, Any], out_dir: str, threads: int, verbose: bool) -> None:
    """Entry point of a worker process: lead a process group, log to ``out_dir/log.txt``, set the thread count,
    run and record."""
    _own_group()
    log_path = Path(out_dir) / "log.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=log, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    import torch

    torch.set_num_threads(threads)
    spec = RunSpec.from_dict(spec_dict)
    run_and_record(spec, out_dir)


def _own_group() -> None:
    """Make the calling worker the leader of a new process group, so that stopping its run (time limit, interrupted
    grid) reaches its children too (data-loader workers), and make the group die with the driver. The first thing a
    worker entry point should do."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    die_with_parent()


PARENT_POLL_S = 0.5
"""How often a worker checks that the driver that started it is still alive."""


def die_with_parent(poll_s: float = PARENT_POLL_S) -> threading.Thread | None:
    """Start a daemon thread that kills this process's group (SIGKILL) as soon as its parent process is gone.

    A worker leads its own process group, so it escapes a terminal's hangup and a ``kill`` of the driver's group;
    this watchdog makes it (and its data-loader workers) end with the driver even when the driver is killed with
    SIGKILL and cannot stop them. The parent is the multiprocessing parent when there is one (so a driver that died
    before the thread started is noticed too), else the current parent pid.
    """
    if not hasattr(os, "getppid") or not hasattr(os, "killpg"):
        return None
    parent = mp.parent_process()
    ppid = parent.pid if parent is not None and parent.pid else os.getppid()

    def watch() -> None:
        while os.getppid() == ppid:
            time.sleep(poll_s)
        logger.error("the vpeft bench driver (pid %d) is gone: stopping this run", ppid)
        os.killpg(os.getpgrp(), getattr(signal, "SIGKILL", signal.SIGTERM))

    thread = threading.Thread(target=watch, name="vpeft-parent-watchdog", daemon=True)
    thread.start()
    return thread


def _signal_tree(proc: mp.process.BaseProcess, sig: int) -> None:
    """Send ``sig`` to the worker's process group (the worker and its children), else to the worker alone.

    A worker has no group of its own on non-POSIX systems, and before its entry point called :func:`_own_group`
    (while it is still starting), when it has no children yet either.
    """
    if proc.pid is None:
        return
    if hasattr(os, "killpg"):
        try:
            os.killpg(proc.pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass  # no such group: not made yet, or gone with all its members
    if proc.exitcode is None:
        if sig == signal.SIGTERM:
            proc.terminate()
        else:
            proc.kill()


def _stop_workers(procs: Sequence[mp.process.BaseProcess], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM every worker's process group, wait up to ``grace_s`` for the workers, then SIGKILL the groups."""
    for proc in procs:
        _signal_tree(proc, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(end - time.monotonic(), 0.0))
    for proc in procs:  # what ignored SIGTERM, and any child left behind by its worker
        _signal_tree(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
    for proc in procs:
        proc.join(timeout=5)


def _run_pool(
    todo: Sequence[RunSpec],
    out: Path,
    workers: int,
    threads: int,
    progress: Progress,
    verbose: bool,
    target: Callable[[dict[str, Any], str, int, bool], None] = _worker_main,
    run_timeout_s: float | None = None,
    timeout_source: str = "--run-timeout",
    kill_grace_s: float = KILL_GRACE_S,
) -> list[dict[str, Any]]:
    """Run ``todo`` in fresh ``spawn`` processes, ``workers`` at a time; ``target`` is the worker entry point
    (it should call :func:`_own_group` first).

    A worker still running ``run_timeout_s`` seconds after it started is stopped (SIGTERM to its process group,
    SIGKILL after ``kill_grace_s``) and its run recorded as failed (``timeout_source`` names the limit's origin).
    """
    pool = _Pool(out, threads, verbose, target, progress, Deadlines(run_timeout_s), run_timeout_s, timeout_source)
    pending = list(todo)
    previous = _stop_on_sigterm()
    try:
        while pending or pool.running:
            while pending and len(pool.running) < workers:
                pool.start(pending.pop(0))
            for sentinel in wait(list(pool.running), timeout=pool.deadlines.wait_s(30.0)):
                pool.collect(sentinel)
            pool.stop_overdue(kill_grace_s)
    finally:
        _stop_workers([proc for proc, _, _ in pool.running.values()], kill_grace_s)  # interrupted: stop ours
        for sig, handler in (previous or {}).items():
            if handler is not None:  # None: a handler not set from Python, which cannot be restored
                signal.signal(sig, handler)
    return pool.records


class _Pool:
    """The running worker processes of :func:`_run_pool` (by sentinel), their deadlines and the records so far."""

    def __init__(self, out: Path, threads: int, verbose: bool, target, progress: Progress, deadlines: Deadlines,
                 limit_s: float | None, timeout_source: str):  # fmt: skip
        self.out, self.threads, self.verbose, self.target, self.progress = out, threads, verbose, target, progress
        self.deadlines, self.limit_s, self.timeout_source = deadlines, limit_s, timeout_source
        self.ctx = mp.get_context("spawn")
        self.running: dict[Any, tuple[Any, RunSpec, Path]] = {}
        self.records: list[dict[str, Any]] = []

    def start(self, spec: RunSpec) -> None:
        rdir = run_dir(self.out, spec.method_label, spec.task, spec.seed)
        (rdir / "record.json").unlink(missing_ok=True)  # an old failure must not stand in for this attempt
        proc = self.ctx.Process(target=self.target, args=(spec.to_dict(), str(rdir), self.threads, self.verbose),
                                name=f"vpeft-bench-{spec.run_id}")  # fmt: skip
        proc.start()
        self.running[proc.sentinel] = (proc, spec, rdir)
        self.deadlines.start(proc.sentinel)
        self.progress.started(spec.run_id)

    def collect(self, sentinel: Any, elapsed: float | None = None) -> None:
        """Record a finished worker's run (``elapsed``: it was stopped at its time limit after that long)."""
        proc, spec, rdir = self.running.pop(sentinel)
        self.deadlines.stop(sentinel)
        if elapsed is None:  # a stopped worker was joined by _stop_workers
            proc.join()
            _signal_tree(proc, getattr(signal, "SIGKILL", signal.SIGTERM))  # children it left behind, if any
        rec = read_record(rdir / "record.json")
        if rec is None or rec.get("fingerprint") != spec.fingerprint():
            if elapsed is not None:
                rec = timed_out_record(spec, rdir, elapsed, self.limit_s, self.timeout_source)
            else:
                rec = died_record(spec, rdir, proc.exitcode)
        self.records.append(rec)
        self.progress.finished(spec.run_id, rec)

    def stop_overdue(self, kill_grace_s: float) -> None:
        """Stop the workers past their time limit and record them as timed out."""
        overdue = {s: self.deadlines.clock() - self.deadlines.started[s] for s in self.deadlines.overdue()}
        if not overdue:
            return
        for sentinel, elapsed in overdue.items():
            logger.warning("%s: no result after %.0f s: stopping it", self.running[sentinel][1].run_id, elapsed)
        _stop_workers([self.running[s][0] for s in overdue], kill_grace_s)
        for sentinel, elapsed in overdue.items():
            self.collect(sentinel, elapsed)


def _stop_on_sigterm() -> dict[int, Any] | None:
    """Turn SIGTERM and SIGHUP into ``SystemExit`` (so the pool stops its workers, which lead their own process
    groups and so miss a terminal's hangup); return the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    return {sig: signal.signal(sig, handler) for sig in sigs}


def _run_inline(todo: Sequence[RunSpec], out: Path, progress: Progress) -> list[dict[str, Any]]:
    records = []
    for spec in todo:
        progress.started(spec.run_id)
        rec = run_and_record(spec, run_dir(out, spec.method_label, spec.task, spec.seed))
        records.append(rec)
        progress.finished(spec.run_id, rec)
    return records


# ---- entry point --------------------------------------------------------------------------------------------------
def run_bench(
    definition: BenchDefinition,
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    workers: int | None = None,
    threads: int | None = None,
    data_root: str | os.PathLike | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    verbose: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    run_timeout_s: float | None = None,
) -> BenchSummary:
    """Run every (method, task, seed) of ``definition`` not finished yet in ``out_dir``; return a summary.

    Args:
        definition: A validated definition (:func:`vpeft.bench.load_definition`).
        out_dir: The results folder (created); finished runs found there are skipped.
        methods, tasks, seeds: Restrict the grid (method labels, task names, seeds of the definition).
        workers: Concurrent runs (default: one per 4 cores, at least 1); 0 runs everything in this process.
        threads: Torch threads per worker (default: cores / workers).
        data_root: Overrides the definition's ``data_root`` (the folder holding the task folders).
        backend: ``local`` (a process pool on this machine) or ``ray`` (one Ray task per run, see
            :mod:`vpeft.bench.ray_backend`): on the cluster at ``ray_address``, else a local Ray with
            ``workers x threads`` CPUs.
        progress: Print one progress line per event to ``stream`` (default stderr).
        verbose: INFO-level logs in the workers' ``log.txt``.
        on_record: Called with each new record.
        run_timeout_s: Wall-clock limit per run in seconds (overrides the definition's ``run_timeout_s``); a run
            past it is stopped and recorded as failed. Not enforceable with ``workers=0`` (in-process runs).

    Raises:
        ConfigError: A bad option (``run_timeout_s`` <= 0, or given with ``workers=0``), an unknown backend,
            method label, task or seed.
        DataError: Task folders missing.
    """
    out = Path(out_dir)
    inline = workers == 0
    given = check_run_timeout(run_timeout_s, "--run-timeout")
    if given is not None:
        if inline and backend == "local":
            raise ConfigError(
                f"--run-timeout {given:g} needs worker processes: with --workers 0 the runs execute in this "
                "process, where a hung run cannot be stopped; use --workers 1 or more, or leave out --run-timeout"
            )
        definition = dataclasses.replace(definition, run_timeout_s=given)
    elif inline and backend == "local" and definition.run_timeout_s is not None:
        logger.warning("the definition's run_timeout_s (%g s) is not enforced with workers=0", definition.run_timeout_s)
    limit, source = definition.run_timeout_s, "--run-timeout" if given is not None else "run_timeout_s:"
    definition = resolve_roots(definition, data_root)
    runs = definition.runs(methods, tasks, seeds)
    prepare_tasks(runs)
    out.mkdir(parents=True, exist_ok=True)
    with results_lock(out):
        return _run_locked(definition, out, runs, workers, threads, backend, ray_address, inline, progress, stream,
                           verbose, on_record, limit, source)  # fmt: skip


def _run_locked(definition, out, runs, workers, threads, backend, ray_address, inline, progress, stream, verbose,
                on_record, limit, source) -> BenchSummary:  # fmt: skip
    """The body of :func:`run_bench`, run while this process holds the results folder's lock."""
    current = {spec.run_id: spec.fingerprint() for spec in definition.runs()}  # the whole grid, not the selection
    write_json_atomic(out / "definition.json", {**definition.to_dict(), "run_fingerprints": current})
    todo, done = plan_runs(runs, out)
    workers, threads = default_parallelism(workers or None, threads)
    summary = BenchSummary(out, total=len(runs), skipped=len(done))
    bar = Progress(len(todo), 1 if inline else workers, stream, progress)
    if progress and done:
        bar.stream.write(f"[bench] {len(done)} of {len(runs)} runs already finished in {out}: skipped\n")
    start = time.monotonic()
    if not todo:
        records = []
    elif backend == "ray":
        from vpeft.bench.ray_backend import run_ray

        records = run_ray(todo, out, ray_address, workers, threads, bar, run_timeout_s=limit, timeout_source=source)
    elif backend != "local":
        raise ConfigError(f"unknown backend {backend!r}; valid: local, ray")
    elif inline:
        records = _run_inline(todo, out, bar)
    else:
        records = _run_pool(todo, out, workers, threads, bar, verbose, run_timeout_s=limit, timeout_source=source)
    for rec in records:
        if rec.get("status") == "ok":
            summary.ok += 1
        else:
            summary.failed += 1
            summary.failures.append(f"{rec['run_id']}: {rec.get('error')}")
        if on_record is not None:
            on_record(rec)
    summary.elapsed_s = time.monotonic() - start
    return summary
