"""Dynamic batching: requests for any adapters are queued and run together, one forward per group.

A worker thread takes the oldest queued request, then keeps taking requests until the batch holds
``max_batch_size`` of them or ``max_wait_ms`` have passed since that oldest request arrived (a request that waited
while the previous batch ran is not made to wait again). The batch is split by :meth:`AdapterStore.group_of`: all
shared adapters are one group (one backbone forward), every other adapter its own group; within a group the inputs
must have one shape (they do: the server resizes every input of an adapter to its input size). Each group runs once
and the futures of its requests are resolved with their sample's output; a group that fails (a delta that does not
load, a bad input shape) fails its own requests only. The store is held (:meth:`AdapterStore.exclusive`) from the
grouping to the last forward of a batch, so a rescan of the folder runs between batches, never inside one.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from ..errors import ConfigError
from .store import AdapterStore

__all__ = ["BatchRecord", "DynamicBatcher"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Request:
    adapter: str
    x: torch.Tensor
    future: Future
    queued: float


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """One batch the worker ran: its size, the requests of each group, seconds spent running it."""

    size: int
    groups: dict[str, int]
    seconds: float


class DynamicBatcher:
    """Queue requests and run them in batches on an :class:`AdapterStore` (see the module docstring).

    Args:
        store: the adapters.
        max_batch_size: at most this many requests per batch (>= 1).
        max_wait_ms: how long the oldest request of a batch may wait for others (>= 0; 0: take what is queued).
        on_batch: called with a :class:`BatchRecord` after each batch (metrics).

    Use as a context manager, or :meth:`start` / :meth:`close`.
    """

    def __init__(
        self,
        store: AdapterStore,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size={max_batch_size!r} must be an int >= 1")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ConfigError(f"max_wait_ms={max_wait_ms!r} must be a number >= 0")
        self.store, self.max_batch_size, self.max_wait = store, max_batch_size, float(max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.batches = 0

    # ---- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> DynamicBatcher:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="vpeft-serve-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the batch in progress; queued requests that did not run fail."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None and not req.future.done():
                req.future.set_exception(RuntimeError("the server is shutting down"))

    def __enter__(self) -> DynamicBatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return self._queue.qsize()

    # ---- requests -----------------------------------------------------------------------------------------------
    def submit(self, adapter: str, x: torch.Tensor) -> Future:
        """Queue one sample ``x`` (``(C, H, W)``) for ``adapter``; the future gives its output (a CPU tensor).

        Raises (at once, before queueing): UnknownNameError / AdapterRefusedError for an adapter not served;
        ConfigError when the batcher is not running.
        """
        self.store.info(adapter)
        if self._thread is None or self._stopping.is_set():
            raise ConfigError("the batcher is not running; call start() (or use it as a context manager)")
        future: Future = Future()
        self._queue.put(_Request(adapter, x, future, time.monotonic()))
        return future

    def predict(self, adapter: str, x: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """:meth:`submit` and wait for the output."""
        return self.submit(adapter, x).result(timeout)

    # ---- the worker ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            deadline = first.queued + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    req = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if req is None:
                    self._stopping.set()
                    break
                batch.append(req)
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        # the store is held from grouping to the last forward: a rescan (or load / unload) waits for the batch, so
        # an adapter grouped here is still there when its group runs
        with self.store.exclusive():
            self._run_held(batch)

    def _run_held(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        groups: dict[str, list[_Request]] = {}
        for req in batch:
            if not req.future.set_running_or_notify_cancel():
                continue
            try:
                groups.setdefault(self.store.group_of(req.adapter), []).append(req)
            except Exception as exc:  # noqa: BLE001 - the adapter was refused since it was queued
                req.future.set_exception(exc)
        for reqs in groups.values():
            try:
                x = torch.stack([r.x for r in reqs])
                out = self.store.run([r.adapter for r in reqs], x)
            except Exception as exc:  # noqa: BLE001 - a failing group fails its own requests, never the worker
                log.warning("batch group %s failed: %s", [r.adapter for r in reqs], exc)
                for r in reqs:
                    r.future.set_exception(exc)
                continue
            for r, o in zip(reqs, out):
                if isinstance(o, BaseException):  # this sample's adapter failed; its batch-mates ran
                    r.future.set_exception(o)
                else:
                    r.future.set_result(o)
        self.batches += 1
        if self.on_batch is not None:
            record = BatchRecord(len(batch), {k: len(v) for k, v in groups.items()}, time.perf_counter() - start)
            try:
                self.on_batch(record)
            except Exception:  # noqa: BLE001 - metrics never stop the worker
                log.exception("on_batch callback failed")
