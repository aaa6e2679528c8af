"""Shared helpers of the benchmark scripts: models, interleaved timing, peak memory, tables, JSON.

Timing: every configuration is warmed up, then measured in ``repeats`` rounds; each round runs every
configuration once, in an order rotated by one per round, so slow phases of a shared machine hit all
configurations alike. The median per configuration is reported, and ratios are taken between medians of
the same run only. With one intra-op thread on CPU the clock is the process's CPU time
(``time.process_time``), which does not count the time the scheduler gives to other processes on a shared
machine (wall time there varied by 2x between identical calls); otherwise, and on CUDA, wall time.

Peak memory on CPU (:class:`RSSPeak`): glibc is told to serve every allocation of 64 KiB or more with its
own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so freed tensors leave the resident set at once and the
resident set tracks the bytes actually alive; a thread samples ``/proc/self/statm`` every 0.5 ms while the
step runs, and the peak minus the resident size before the step is reported. Python's ``tracemalloc`` sees
no tensor memory and ``ru_maxrss`` is a process-lifetime high-water mark, so neither is used. On CUDA the
allocator's own ``max_memory_allocated`` is used. After the memory phase the allocator is switched back to
large thresholds so timing is not charged with a page fault per allocation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

# a tiny ViT for --quick runs (seconds on a laptop core): same code paths as the real one
QUICK_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
QUICK_MODEL = "vit_tiny_patch16_224"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def create_model(name: str, size: int, num_classes: int = 10, quick: bool = False, seed: int = 0) -> nn.Module:
    """A randomly initialised timm model (no download); ``quick`` gives the tiny ViT of :data:`QUICK_VIT`."""
    torch.manual_seed(seed)
    kwargs = dict(QUICK_VIT) if quick else {"img_size": size}
    return timm.create_model(QUICK_MODEL if quick else name, pretrained=False, num_classes=num_classes, **kwargs)


def set_threads(threads: int) -> int:
    """Use ``threads`` intra-op threads (0: torch's default); returns the number in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_clock(device: torch.device, threads: int) -> str:
    """``"cpu"`` (process CPU time) for single-threaded CPU runs, else ``"wall"``."""
    return "cpu" if device.type == "cpu" and threads == 1 else "wall"


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, progress: bool = True, clock: str = "wall"
) -> dict[str, list[float]]:
    """Seconds per call of every function, ``repeats`` rounds, each round in a rotated order (warm them up first)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    names, times = list(fns), {n: [] for n in fns}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(device)
            start = now()
            fns[name]()
            sync(device)
            times[name].append(now() - start)
        if progress:
            print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---- peak memory ------------------------------------------------------------------------------------------
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 (glibc only)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def exact_cpu_memory(on: bool) -> bool:
    """``on``: every allocation >= 64 KiB gets its own mmap (RSS = live bytes); off: 32 MiB thresholds."""
    libc = _libc()
    if libc is None:
        return False
    if on:
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    libc.malloc_trim(0)
    return True


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak resident-set growth (bytes) over a ``with`` block, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 5e-4, base: int | None = None) -> None:
        self.interval, self.base, self.peak = interval, base, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> RSSPeak:
        if self.base is None:
            self.base = _rss()
        self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - (self.base or 0)


def memory_supported(device: torch.device) -> bool:
    return device.type == "cuda" or (_libc() is not None and Path("/proc/self/statm").exists())


def current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _rss()


class PeakMemory:
    """Peak memory growth over a ``with`` block relative to ``base`` (bytes): CUDA allocator or sampled RSS."""

    def __init__(self, device: torch.device, base: int) -> None:
        self.device, self.base, self.growth = device, base, 0
        self._rss = None if device.type == "cuda" else RSSPeak(base=base)

    def __enter__(self) -> PeakMemory:
        if self._rss is not None:
            self._rss.__enter__()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rss is not None:
            self._rss.__exit__(*exc)
            self.growth = self._rss.growth
        else:
            self.growth = torch.cuda.max_memory_allocated(self.device) - self.base


def trim() -> None:
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, except ``exclude``'s (weights, the input)."""

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


# ---- output -----------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``columns``: (key, header, format spec); missing values print as ``-``."""

    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, k, s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        print(f"results written to {path}")


def header(title: str, device: torch.device, threads: int, extra: str = "", clock: str | None = None) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = {"cpu": ", times are process CPU time", "wall": ", times are wall time", None: ""}[clock]
    return (
        f"# {title}\n"
        f"torch {torch.__version__}, timm {timm.__version__}, device {device}, {threads} intra-op thread(s), "
        f"{os.cpu_count()} CPUs, load average {load:.1f}{what}{extra}"
    )
