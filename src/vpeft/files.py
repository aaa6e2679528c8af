"""The files vpeft writes: atomic replacement, the umask's mode, one-line write errors, one writer per folder.

Every file vpeft writes (checkpoints, metrics, results, bench records and reports, study summaries, generated data)
goes through :func:`atomic_write`: the content is written to a temporary file in the target's folder, flushed to
disk, given the mode a plain ``open()`` would have given it (``0o666`` minus the umask: ``0o644`` under the usual
``0022``; ``mkstemp`` alone leaves ``0o600``), renamed over the target, and the folder is fsynced so the rename
itself survives a crash. A reader sees the old file or the new one, never a part. Any failure (disk full, read-only
file system, permission, quota) removes the temporary file, leaves the previous file as it was, and raises a
:class:`WriteError` naming the path and the reason.

:func:`folder_lock` makes one process the writer of an output folder: an exclusive ``flock`` on a lock file in it,
taken before the folder is checked and held while it is written; the file names its holder (command, pid, host,
start time) for the refusal message, and is removed on release.
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vpeft.config import declare_option_check
from vpeft.errors import ConfigError, VpeftError

__all__ = [
    "LOCK_NAME",
    "WriteError",
    "atomic_write",
    "check_destination",
    "destination_option",
    "pid_alive",
    "file_mode",
    "folder_lock",
    "is_lock_file",
    "write_error",
    "write_text_atomic",
    "writing",
]

LOCK_NAME = ".vpeft.lock"
"""The lock file :func:`folder_lock` holds in an output folder (``vpeft train``, ``tune``, ``eval --save-masks``)."""


class WriteError(VpeftError, OSError):
    """Writing a file failed; ``filename`` is the file vpeft was writing, ``strerror`` the reason.

    It is an ``OSError`` (``errno`` kept), so ``except OSError`` still catches it, and a :class:`VpeftError`.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename!r}: {self.strerror}"


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_error(path: str | os.PathLike, exc: BaseException) -> WriteError | None:
    """``exc`` as a :class:`WriteError` on ``path`` when it is an I/O failure, else ``None``.

    An ``OSError`` gives its ``errno`` and ``strerror``; a library error that reports the OS error in its message
    (safetensors: ``... (os error 28) ...``) gives that error's. ``WriteError`` passes through.
    """
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError):
        return WriteError(exc.errno, exc.strerror or str(exc) or type(exc).__name__, str(path))
    m = _OS_ERROR.search(str(exc))
    if m:
        code = int(m.group(1))
        return WriteError(code, os.strerror(code), str(path))
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O failure inside the block into a one-line :class:`WriteError` naming ``path``."""
    try:
        yield
    except Exception as exc:
        err = write_error(path, exc)
        if err is None:
            raise
        raise err from None


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` minus the process umask (read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it, then put it back
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible everywhere (e.g. Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, then it replaces ``path``.

    ``write`` gets the temporary file's path (an empty file) and must write the whole content there. The file is
    fsynced, chmod'ed to :func:`file_mode`, renamed over ``path`` and the folder fsynced.

    Raises:
        WriteError: Any I/O failure (the temporary file removed, ``path`` left as it was).
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        err = write_error(path, exc) if isinstance(exc, Exception) else None
        if err is None:
            raise
        raise err from None
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_destination(what: str, path: str | os.PathLike, *, folder: bool, file_hint: str = "a file name") -> None:
    """Refuse, before any work, a destination vpeft could not write, with one line naming ``what`` (the option,
    e.g. ``--save-masks``) and the path; nothing is created.

    ``folder=True``: ``path`` is a folder to write files into (made later if missing); ``False``: a file to write
    (its folder made later if missing; ``file_hint`` says what to give instead of a folder). Refused: a file where
    a folder is wanted or the reverse, a path under a regular file, and a folder whose nearest existing part cannot
    be written (read-only file system, permission, quota): a temporary file is created and removed there
    (``tempfile.TemporaryFile``, the same probe as ``vpeft train --out``).

    Raises:
        ConfigError: The destination cannot be written.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a folder; choose a folder")
    if not folder and path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a folder; give {file_hint}")
    existing = path if folder else path.parent
    existing = existing.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is under the file {str(existing)!r}, which cannot hold a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        where = "" if existing == path.absolute() else f" (tested in {str(existing)!r}, its nearest existing folder)"
        raise ConfigError(
            f"{what} {str(path)!r} is not writable ({exc.strerror or exc}){where}; choose another place"
        ) from None


def destination_option(parser: Any, *flags: str, folder: bool, file_hint: str = "a file name", **kwargs: Any) -> Any:
    """``parser.add_argument(*flags, **kwargs)`` for an option naming where a command writes (``folder``: a folder,
    else a file): :func:`check_destination` runs on it before the command's work (:func:`vpeft.config.check_options`),
    its default included unless ``None``."""

    def check(flag: str, value: Any) -> None:
        check_destination(flag, value, folder=folder, file_hint=file_hint)

    return declare_option_check(parser, parser.add_argument(*flags, **kwargs), check)


def is_lock_file(name: str) -> bool:
    """Whether a file name is a vpeft lock file (not part of a folder's contents)."""
    return name.startswith(".vpeft") and name.endswith(".lock")


@contextmanager
def folder_lock(
    folder: str | os.PathLike, owner: str, *, what: str = "folder", name: str = LOCK_NAME, wait: bool = False
) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block: one process writes an output folder at a time.

    An exclusive ``flock`` on ``folder/name`` (the kernel releases it when the holder exits, even by SIGKILL, so a
    stale lock never blocks), taken at once or refused (``wait=True``: waited for). The file holds the holder's
    ``{command, pid, host, since}`` and is removed on release (a finished folder holds only its results).
    ``owner`` names the holder in that record (e.g. ``"vpeft train"``); ``what`` names the folder in messages
    (e.g. ``"--out"``). Where ``fcntl`` is missing, the file is created exclusively and a lock whose pid is no
    longer alive is taken over.

    Raises:
        ConfigError: Another live process holds the lock (its command and pid named), or ``folder`` cannot hold
            a lock file (a file, not writable).
    """
    folder = Path(folder)
    path = folder / name
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {str(folder)!r} is a file, not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{what} {str(folder)!r} is not writable ({exc.strerror or exc}); choose another folder"
        ) from None
    holder = json.dumps(
        {"command": owner, "pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield from _pid_lock(path, holder, what)
        return
    fd = _flock(path, what, fcntl, wait)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a process that opened it re-checks the inode
        os.close(fd)  # releases the flock


def _flock(path: Path, what: str, fcntl: Any, wait: bool) -> int:
    """An fd of ``path`` holding its exclusive flock; the file it locks is the one at ``path`` (not a removed one)."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"{what} {str(path.parent)!r} is not writable ({exc.strerror or exc}); choose another folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            raw = os.pread(fd, 4096, 0)
            os.close(fd)
            raise _in_use(path, raw, what) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
    raise _in_use(path, b"", what)


def _in_use(path: Path, raw: bytes, what: str) -> ConfigError:
    try:
        info = json.loads(raw.decode("utf-8", errors="replace") or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict):
        info = {}
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')}"
    return ConfigError(
        f"{what} {path.parent} is in use by another {info.get('command', 'vpeft process')} ({who}); a folder has one "
        "writer at a time: wait for it to finish, stop it, or use another --out"
    )


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_lock(path: Path, holder: str, what: str) -> Iterator[Path]:  # pragma: no cover - no fcntl
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
            if pid and pid_alive(pid):
                raise _in_use(path, raw, what) from None
            path.unlink(missing_ok=True)  # stale: its holder is gone
    else:
        raise _in_use(path, path.read_bytes(), what)
    try:
        os.write(fd, holder.encode())
        os.close(fd)
        yield path
    finally:
        path.unlink(missing_ok=True)
