"""VTAB-1k task folders and plain image folders as PyTorch datasets.

The VTAB-1k folder format is the one of the NOAH / V-PETL release (Zhai et al., 2019, "A Large-scale
Study of Representation Learning with the Visual Task Adaptation Benchmark"; Zhang et al., 2022,
"Neural Prompt Search")::

    <root>/<task>/
        images/...                 the image files
        classes.txt                optional; one class name per line, line i names label i
        train800.txt               800 training examples
        val200.txt                 200 validation examples
        train800val200.txt         the union, used to retrain after tuning
        test.txt                   the test split, touched once

Each list line is ``<path relative to the task folder> <label index>``. Lists are parsed and every image is
checked to exist and to decode when a dataset is built (:mod:`vpeft.data.images`), so a broken task fails at
construction, not mid-epoch. Images of every PIL mode become 8-bit RGB by the rule of their mode (16-bit and
float images are scaled, not clipped; see :func:`vpeft.data.images.to_rgb`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from vpeft.data.images import check_images, open_rgb
from vpeft.errors import DataError, suggest

__all__ = [
    "SPLITS",
    "IMG_EXTENSIONS",
    "VTABTask",
    "ImageListDataset",
    "ImageFolderDataset",
    "load_split",
    "list_tasks",
    "default_data_root",
    "read_split_list",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
IMG_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[[Image.Image], Any]


def default_data_root() -> Path:
    """Return the default folder that holds VTAB-1k task folders.

    Resolution order:

    1. ``$VPEFT_DATA`` if set (``~`` is expanded; the folder need not exist yet);
    2. ``../shared/data/vtab1k`` relative to the current working directory, if it exists;
    3. ``../shared/data/vtab1k`` relative to the repository checkout this package is imported from
       (``src/vpeft`` layout), if it exists;
    4. ``~/.cache/vpeft/data`` otherwise (a fresh machine: export the digits task there with
       :func:`vpeft.data.ensure_digits_task`).

    Returns:
        The data root (not created).
    """
    env = os.environ.get("VPEFT_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]
    for base in (Path.cwd(), repo):
        candidate = (base / ".." / "shared" / "data" / "vtab1k").resolve()
        if candidate.is_dir():
            return candidate
    return Path.home() / ".cache" / "vpeft" / "data"


def list_tasks(root: str | Path) -> list[str]:
    """Names of the task folders under ``root`` (non-hidden folders holding at least one split list)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any((p / f"{s}.txt").is_file() for s in SPLITS)
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(suggest(split, SPLITS, "split"))


def read_split_list(
    task_dir: str | Path, split: str, num_classes: int | None = None, check_files: bool = True
) -> list[tuple[Path, int]]:
    """Parse ``<task_dir>/<split>.txt`` into ``(image path, label)`` pairs.

    Args:
        task_dir: The task folder.
        split: One of :data:`SPLITS`.
        num_classes: If given, every label must lie in ``[0, num_classes)``; otherwise labels must be >= 0.
        check_files: Also check that every image file exists.

    Returns:
        Absolute image paths with their integer labels, in file order.

    Raises:
        DataError: Unknown split, missing list file, malformed line, label out of range or missing image.
    """
    _check_split(split)
    task_dir = Path(task_dir)
    list_file = task_dir / f"{split}.txt"
    if not list_file.is_file():
        present = [s for s in SPLITS if (task_dir / f"{s}.txt").is_file()]
        raise DataError(f"split list {list_file} does not exist; lists present: {', '.join(present) or 'none'}")
    samples = []
    for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        path, label = _parse_line(line, f"{list_file.name}:{lineno}")
        _check_label(label, num_classes, f"{list_file.name}:{lineno}", task_dir)
        full = task_dir / path
        if check_files and not full.is_file():
            raise DataError(f"image {full} listed at {list_file.name}:{lineno} does not exist")
        samples.append((full, label))
    if not samples:
        raise DataError(f"split list {list_file} is empty")
    return samples


def _check_label(label: int, num_classes: int | None, where: str, task_dir: Path) -> None:
    if label < 0 or (num_classes is not None and label >= num_classes):
        upper = num_classes if num_classes is not None else "inf"
        raise DataError(f"label {label} at {where} is outside [0, {upper}) (task folder {task_dir})")


def _parse_line(line: str, where: str) -> tuple[str, int]:
    """Split ``'<path> <label>'`` (the path may contain spaces; the label is the last field)."""
    parts = line.rsplit(maxsplit=1)
    if len(parts) != 2:
        raise DataError(f"malformed line {where}: {line!r}; expected '<relative image path> <label index>'")
    try:
        return parts[0], int(parts[1])
    except ValueError:
        raise DataError(f"malformed line {where}: {line!r}; label {parts[1]!r} is not an integer") from None


def _read_class_names(task_dir: Path) -> tuple[str, ...] | None:
    path = task_dir / "classes.txt"
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise DataError(f"{path} is empty; remove it or list one class name per line")
    return names


@dataclass(frozen=True)
class VTABTask:
    """Description of one VTAB-1k task folder.

    Attributes:
        task_dir: The task folder.
        num_classes: Number of classes: the length of ``classes.txt``, else max label + 1 over all lists.
        class_names: Class names from ``classes.txt``, else ``("0", "1", ...)``.
    """

    task_dir: Path
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def name(self) -> str:
        """The task's folder name."""
        return self.task_dir.name

    @classmethod
    def from_dir(cls, task_dir: str | Path) -> VTABTask:
        """Describe the task in ``task_dir``.

        Raises:
            DataError: The folder does not exist or holds no split list.
        """
        task_dir = Path(task_dir)
        if not task_dir.is_dir():
            raise DataError(f"task folder {task_dir} does not exist")
        if not any((task_dir / f"{s}.txt").is_file() for s in SPLITS):
            raise DataError(f"task folder {task_dir} holds none of the split lists {', '.join(SPLITS)}")
        names = _read_class_names(task_dir)
        if names is None:
            names = tuple(str(i) for i in range(_max_label(task_dir) + 1))
        return cls(task_dir=task_dir, num_classes=len(names), class_names=names)

    def splits(self) -> list[str]:
        """The splits whose list file exists, in :data:`SPLITS` order."""
        return [s for s in SPLITS if (self.task_dir / f"{s}.txt").is_file()]

    def dataset(self, split: str, transform: Transform | None = None) -> ImageListDataset:
        """Build the dataset of one split of this task."""
        return ImageListDataset(self.task_dir, split, transform=transform, num_classes=self.num_classes)


def _max_label(task_dir: Path) -> int:
    """Largest label over all split lists present (image files are not checked here)."""
    present = [s for s in SPLITS if (task_dir / f"{s}.txt").is_file()]
    return max(y for s in present for _, y in read_split_list(task_dir, s, check_files=False))


class _SampleDataset(Dataset):
    """Shared ``__getitem__``: open the image as RGB, apply the transform, return ``(image, label)``."""

    samples: list[tuple[Path, int]]
    transform: Transform | None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = open_rgb(path)  # 16-bit / float modes scaled by their range (vpeft.data.images)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    @property
    def targets(self) -> list[int]:
        """All labels, in sample order."""
        return [y for _, y in self.samples]


class ImageListDataset(_SampleDataset):
    """One split of a VTAB-1k task folder.

    Args:
        task_dir: The task folder (holding ``images/`` and the split lists).
        split: One of ``train800``, ``val200``, ``train800val200``, ``test``.
        transform: Applied to the RGB PIL image (e.g. from :func:`vpeft.data.build_transform`).
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``. ``None`` reads it from the
            task (``classes.txt``, else max label + 1 over all lists).
        verify: Decode-check every image up front (once per process, :func:`vpeft.data.images.check_images`).
            Default: every split but ``test``, whose images the protocol reads once, at the end: a bad test image
            is a DataError naming it when it is read.

    Raises:
        DataError: Missing folder or list, unknown split, malformed line, label out of range, missing or
            unreadable image.
    """

    def __init__(
        self,
        task_dir: str | Path,
        split: str,
        transform: Transform | None = None,
        num_classes: int | None = None,
        verify: bool | None = None,
    ) -> None:
        _check_split(split)
        task = VTABTask.from_dir(task_dir)
        self.task_dir = task.task_dir
        self.split = split
        self.num_classes = task.num_classes if num_classes is None else num_classes
        self.class_names = task.class_names
        self.transform = transform
        self.samples = read_split_list(self.task_dir, split, num_classes=self.num_classes)
        if verify if verify is not None else split != "test":
            check_images((p for p, _ in self.samples), f"{task.name}/{split}")
        logger.debug("loaded %s/%s: %d images, %d classes", task.name, split, len(self), self.num_classes)


def load_split(root: str | Path, task: str, split: str, transform: Transform | None = None) -> ImageListDataset:
    """Load one split of the task ``root/task``.

    Args:
        root: Folder holding the task folders (see :func:`default_data_root`).
        task: Task folder name, e.g. ``"cifar10"``.
        split: One of ``train800``, ``val200``, ``train800val200``, ``test``.
        transform: Applied to each RGB PIL image.

    Raises:
        DataError: The task folder is missing (the message lists the tasks present) or the split is invalid.
    """
    _check_split(split)
    root = Path(root)
    task_dir = root / task
    if not task_dir.is_dir():
        present = list_tasks(root)
        if not present:
            raise DataError(f"task {task!r} not found: data root {root} holds no task folders")
        raise DataError(f"task folder {task_dir} not found; " + suggest(task, present, "task"))
    return ImageListDataset(task_dir, split, transform=transform)


class ImageFolderDataset(_SampleDataset):
    """Images stored as ``root/<class name>/<image>``; class index = position in the sorted class names.

    Args:
        root: Folder with one sub-folder per class.
        transform: Applied to each RGB PIL image.
        extensions: File name endings counted as images (case-insensitive).
        verify: Decode-check every image up front (once per process, :func:`vpeft.data.images.check_images`).

    Raises:
        DataError: ``root`` is missing, has no class folders, a class folder has no images, or an image is
            unreadable.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        verify: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataError(f"image folder {self.root} has no class sub-folders (expected root/<class>/<image>)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.transform = transform
        self.samples = [s for name in self.classes for s in self._class_samples(name, tuple(extensions))]
        if verify:
            check_images((p for p, _ in self.samples), str(self.root))

    def _class_samples(self, name: str, extensions: tuple[str, ...]) -> list[tuple[Path, int]]:
        folder = self.root / name
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise DataError(f"class folder {folder} holds no images with extensions {', '.join(extensions)}")
        return [(p, self.class_to_idx[name]) for p in files]
