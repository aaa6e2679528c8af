"""Vision-language evaluation protocols on VTAB-format task folders: few-shot, base-to-novel, cross-dataset.

References: Zhou et al., CoOp (IJCV 2022) -- K-shot training sets, K in {1, 2, 4, 8, 16}, three seeds; Zhou et al.,
CoCoOp (CVPR 2022) -- base-to-novel generalisation (classes sorted by label, the first ceil(n/2) are *base*: train on
base, test on base and on novel, report the harmonic mean HM = 2BN / (B + N)) and cross-dataset transfer (train on
one data set, evaluate zero-shot on the others with their own class names).

* :func:`sample_few_shot` draws K images per class from a split list, seeded and deterministic (per class, the
  sorted list is sampled with ``random.Random(seed)``); :func:`write_list` / :func:`read_list` write and read the
  drawn files in the VTAB list format (``<path relative to the task folder> <label>``), so a run is reproducible
  from its list alone. :func:`few_shot_split` does both for a task folder.
* :func:`base_novel_split` splits class indices; :func:`restrict` keeps the samples of some classes, relabelled
  ``0..len(classes)-1`` in that order (the label order of the matching class-name subset).
* :class:`SampleList` is a dataset over any ``(path, label)`` list (the drawn few-shot set).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..files import write_text_atomic
from .vtab import read_split_list

__all__ = [
    "SHOTS",
    "SampleList",
    "sample_few_shot",
    "few_shot_split",
    "write_list",
    "read_list",
    "relative_to_task",
    "base_novel_split",
    "restrict",
    "harmonic_mean",
]

SHOTS = (1, 2, 4, 8, 16)
Sample = tuple[Path, int]


def sample_few_shot(samples: Sequence[Sample], shots: int, seed: int, *, strict: bool = True) -> list[Sample]:
    """``shots`` samples per class, drawn without replacement with ``random.Random(seed)``; classes in label order.

    Args:
        samples: ``(path, label)`` pairs (a split list).
        shots: K >= 1.
        seed: the draw's seed (same seed, same list -> same draw).
        strict: a class with fewer than K samples raises DataError; otherwise it contributes all it has.
    """
    if not isinstance(shots, int) or shots < 1:
        raise DataError(
            f"shots={shots!r} is invalid; expected an integer >= 1 (CoOp uses {', '.join(map(str, SHOTS))})"
        )
    by_class: dict[int, list[Sample]] = {}
    for path, label in samples:
        by_class.setdefault(int(label), []).append((Path(path), int(label)))
    rng = random.Random(seed)
    out: list[Sample] = []
    for label in sorted(by_class):
        pool = sorted(by_class[label])
        if len(pool) < shots and strict:
            raise DataError(f"class {label} has {len(pool)} samples, fewer than shots={shots}; use strict=False")
        out += rng.sample(pool, min(shots, len(pool)))
    return out


def write_list(samples: Sequence[Sample], path: str | os.PathLike, task_dir: str | os.PathLike) -> Path:
    """Write ``samples`` as a VTAB list (paths relative to ``task_dir``), atomically; return the path."""
    path, task_dir = Path(path), Path(task_dir)
    lines = [f"{relative_to_task(p, task_dir)} {y}" for p, y in samples]
    return write_text_atomic(path, "\n".join(lines) + "\n")


def relative_to_task(image: str | os.PathLike, task_dir: str | os.PathLike) -> str:
    """``image``'s path relative to ``task_dir`` (POSIX), as a list line names it.

    Read lexically first, so a task whose ``images/`` (or any sub-folder) is a symbolic link to a folder elsewhere
    keeps its relative names, as the split lists give them; then through the resolved paths (a folder reached
    through a link on both sides).

    Raises:
        DataError: ``image`` lies outside ``task_dir`` both ways.
    """
    lexical_image, lexical_dir = Path(image).absolute(), Path(task_dir).absolute()
    if lexical_image.is_relative_to(lexical_dir):
        return lexical_image.relative_to(lexical_dir).as_posix()
    real_image, real_dir = Path(image).resolve(), Path(task_dir).resolve()
    if real_image.is_relative_to(real_dir):
        return real_image.relative_to(real_dir).as_posix()
    raise DataError(
        f"image {str(image)!r} is not inside the task folder {str(task_dir)!r}; a sample list names images "
        "relative to their task folder"
    )


def read_list(path: str | os.PathLike, task_dir: str | os.PathLike) -> list[Sample]:
    """Read a list written by :func:`write_list` (every image must exist)."""
    path, task_dir = Path(path), Path(task_dir)
    if not path.is_file():
        raise DataError(f"sample list {str(path)!r} does not exist")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rel, _, label = line.rpartition(" ")
        if not rel or not label.lstrip("-").isdigit():
            raise DataError(f"malformed line {path.name}:{lineno}: {line!r}; expected '<relative path> <label>'")
        full = task_dir / rel
        if not full.is_file():
            raise DataError(f"image {full} listed at {path.name}:{lineno} does not exist")
        out.append((full, int(label)))
    return out


def few_shot_split(
    task_dir: str | os.PathLike,
    shots: int,
    seed: int,
    out_dir: str | os.PathLike,
    source_split: str = "train800val200",
    classes: Sequence[int] | None = None,
    tag: str = "",
) -> tuple[list[Sample], Path]:
    """Draw a K-shot training set from ``source_split`` of a task folder and write it to
    ``<out_dir>/<task>[_<tag>]_shots<K>_seed<seed>.txt``; ``classes`` restricts (and relabels) to those classes
    first (base-to-novel: ``tag="base"``).

    Returns:
        The drawn ``(path, label)`` pairs and the list file written.
    """
    task_dir = Path(task_dir)
    samples = read_split_list(task_dir, source_split)
    if classes is not None:
        samples = restrict(samples, classes)
    drawn = sample_few_shot(samples, shots, seed)
    suffix = f"_{tag}" if tag else ""
    path = write_list(drawn, Path(out_dir) / f"{task_dir.name}{suffix}_shots{shots}_seed{seed}.txt", task_dir)
    return drawn, path


def base_novel_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Class indices sorted; the first ``ceil(n / 2)`` are base, the rest novel (CoCoOp's protocol)."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(f"num_classes={num_classes!r} is invalid; base-to-novel needs at least 2 classes")
    base = math.ceil(num_classes / 2)
    return list(range(base)), list(range(base, num_classes))


def restrict(samples: Sequence[Sample], classes: Sequence[int]) -> list[Sample]:
    """The samples whose label is in ``classes``, relabelled to the label's position in ``classes``."""
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[y]) for p, y in samples if y in index]


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN / (B + N) (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


class SampleList(Dataset):
    """A dataset over ``(path, label)`` pairs: RGB image through ``transform``, label."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            image = img.convert("RGB")
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]
