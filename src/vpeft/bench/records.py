"""Result records on disk: one JSON file per (method, task, seed), written atomically, read back for resume/report.

Layout of a results folder::

    OUT/definition.json                      the resolved definition of the last ``vpeft bench`` call, with the
                                             fingerprint of each of its runs (``run_fingerprints``): the report
                                             shows only records matching them
    OUT/.vpeft-bench.lock                    held by the running ``vpeft bench`` (one writer per folder)
    OUT/runs/<method>/<task>/seed<k>/
        record.json                          the result record (written last: its presence marks a finished run)
        delta.safetensors, metrics.json      the final run's trained delta and per-epoch metrics
        result.json                          :func:`vpeft.run.finetune`'s own record of the final run
        log.txt                              the worker's log (process pool)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from vpeft.files import folder_lock, write_text_atomic
from vpeft.train.metrics import write_json_atomic

__all__ = [
    "RECORD_SCHEMA",
    "environment",
    "git_commit",
    "iter_records",
    "load_records",
    "read_record",
    "record_path",
    "results_lock",
    "run_dir",
    "write_record",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

RECORD_SCHEMA = "vpeft.bench.record/1"


def run_dir(out: str | Path, method: str, task: str, seed: int) -> Path:
    return Path(out) / "runs" / method / task / f"seed{seed}"


def record_path(out: str | Path, method: str, task: str, seed: int) -> Path:
    return run_dir(out, method, task, seed) / "record.json"


LOCK_NAME = ".vpeft-bench.lock"


@contextmanager
def results_lock(out: str | Path) -> Iterator[Path]:
    """Hold the results folder's lock for the block: one ``vpeft bench`` writes a results folder at a time.

    :func:`vpeft.files.folder_lock` on ``OUT/.vpeft-bench.lock`` (an exclusive ``flock`` the kernel frees when the
    holder exits, even by SIGKILL; the file names the holder's pid for the refusal message).

    Raises:
        ConfigError: Another live process holds the lock.
    """
    with folder_lock(out, "vpeft bench", what="results folder", name=LOCK_NAME) as path:
        yield path


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Write a record atomically (temporary file + rename): readers never see a partial record."""
    write_json_atomic(path, {"schema": RECORD_SCHEMA, **record})


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record at ``path``, or ``None`` if it is missing or unreadable (an unreadable one is logged)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable record %s (%s)", path, exc)
        return None
    if not isinstance(rec, dict) or rec.get("schema") != RECORD_SCHEMA:
        logger.warning("ignoring %s: not a vpeft bench record", path)
        return None
    return rec


def iter_records(out: str | Path) -> Iterator[dict[str, Any]]:
    for path in sorted((Path(out) / "runs").glob("*/*/seed*/record.json")):
        rec = read_record(path)
        if rec is not None:
            yield rec


def load_records(out: str | Path) -> list[dict[str, Any]]:
    """Every readable record under ``out/runs`` (finished and failed)."""
    return list(iter_records(out))


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    """The commit of the vpeft source checkout (``None`` outside a git checkout) and whether it has local edits."""
    repo = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, git commit and hardware, stored in every record."""
    import numpy
    import timm
    import torch

    import vpeft

    env: dict[str, Any] = {
        "vpeft": vpeft.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "git": git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
