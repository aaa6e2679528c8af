"""Split lists shared by the folder formats whose lists are ``<split>.txt`` files (segmentation, video).

``trainval`` joins ``train`` and ``val``; ``a+b`` joins any lists. A missing list is a :class:`DataError` naming the
lists (and joined splits) the folder does have.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vpeft.errors import DataError, suggest

__all__ = ["JOINED", "list_files", "present_splits", "split_lists"]

JOINED: dict[str, tuple[str, ...]] = {"trainval": ("train", "val")}


def split_lists(split: str) -> tuple[str, ...]:
    """The list names a split reads: ``trainval`` -> ``(train, val)``, ``a+b`` -> ``(a, b)``."""
    return JOINED.get(split, tuple(split.split("+")))


def present_splits(task_dir: Path, splits: Sequence[str]) -> list[str]:
    """The ``splits`` whose lists all exist in ``task_dir``, in the given order."""
    return [s for s in splits if all((task_dir / f"{n}.txt").is_file() for n in split_lists(s))]


def list_files(task_dir: Path, split: str, splits: Sequence[str]) -> list[Path]:
    """The list files of ``split``; a missing one raises naming the lists and ``splits`` the folder has."""
    files = []
    for name in split_lists(split):
        list_file = task_dir / f"{name}.txt"
        if not name or not list_file.is_file():
            present = sorted(p.stem for p in task_dir.glob("*.txt") if p.name != "classes.txt")
            joined = present_splits(task_dir, splits)
            raise DataError(
                f"split {split!r}: list {list_file} does not exist; "
                + suggest(split, sorted(set(present) | set(joined)) or ["none"], "split")
            )
        files.append(list_file)
    return files
