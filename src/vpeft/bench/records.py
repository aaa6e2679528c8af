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
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from vpeft.errors import ConfigError
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


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


LOCK_NAME = ".vpeft-bench.lock"


@contextmanager
def results_lock(out: str | Path) -> Iterator[Path]:
    """Hold the results folder's lock for the block: one ``vpeft bench`` writes a results folder at a time.

    The lock is an exclusive ``flock`` on ``OUT/.vpeft-bench.lock`` (released by the kernel when the holder exits,
    even by SIGKILL, so a stale lock never blocks), and the file names the holder (pid, host, start time) for the
    refusal message. Where ``fcntl`` is missing, the file is created exclusively and a lock whose pid is no longer
    alive is taken over.

    Raises:
        ConfigError: Another live process holds the lock.
    """
    path = Path(out) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = json.dumps({"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    if fcntl is None:  # pragma: no cover
        yield from _pid_lock(path, holder)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _in_use(path, os.pread(fd, 4096, 0)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def _in_use(path: Path, raw: bytes) -> ConfigError:
    try:
        info = json.loads(raw.decode("utf-8", errors="replace") or "{}")
    except ValueError:
        info = {}
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')}"
    return ConfigError(
        f"results folder {path.parent} is in use by another vpeft bench ({who}); a results folder has one writer: "
        "wait for it to finish, stop it, or use another --out"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_lock(path: Path, holder: str) -> Iterator[Path]:  # pragma: no cover - the fallback without fcntl
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            raw = path.read_bytes()
            try:
                pid = int(json.loads(raw.decode() or "{}").get("pid", 0))
            except (ValueError, AttributeError):
                pid = 0
            if pid and _pid_alive(pid):
                raise _in_use(path, raw) from None
            path.unlink(missing_ok=True)  # stale: its holder is gone
    else:
        raise _in_use(path, path.read_bytes())
    try:
        os.write(fd, holder.encode())
        os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)


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
