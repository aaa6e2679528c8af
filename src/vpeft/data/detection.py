"""Object-detection task folders in COCO format: validation up front, aspect-keeping resize, padded targets.

Folder format (the COCO layout as Roboflow and most labelling tools export it; ``shared/data/det/chess``)::

    <task>/
        annotations/train.json    one COCO file per split: {"images", "annotations", "categories"}
        annotations/valid.json    (any split name; ``a+b`` joins splits, ``trainval`` = train + val/valid)
        annotations/test.json
        images/...                the files the ``images[].file_name`` entries name

``file_name`` is resolved against the task folder, then ``images/<split>/``, then ``images/``. Boxes are COCO
``[x, y, w, h]`` in the stored image's pixels.

What real exports contain is handled, never silently:

* **category ids** need not be contiguous nor start at 0: the categories of the class-defining split (``train``,
  else the first split by name) sorted by id become labels ``0..K-1``, their names kept
  (:attr:`DetectionFolder.class_names`); categories without a single box stay classes (their AP is ``None``);
* **images without boxes** are kept (negatives);
* ``iscrowd`` boxes are carried with their flag: the detector's training ignores them, COCO evaluation uses
  them as crowd regions (detections on them are neither true nor false positives);
* **zero-area boxes and boxes outside their image** are dropped, boxes partly outside are clipped to it; the
  counts are logged as a warning naming the file.

Checked before anything is loaded, each a one-line :class:`~vpeft.errors.DataError` naming the file and the
value: an image that does not exist, an image whose header size differs from the file's ``width``/``height``, a
box with negative width or height (or not four finite numbers), an annotation naming an unknown image id or an
unknown category id, a split whose categories differ from the class-defining split's.

Items are ``(image (3, S, S) float32, target (M, 9) float32)``. The image is resized keeping its aspect ratio so
its longer side is ``S`` (the ``size``), normalised with the backbone's mean/std, and padded at the right and
bottom with zeros (the mean colour) to the square ``S x S`` canvas (ViTDet's padded input; ``S`` a multiple of the
ViT patch). With ``augment`` (training only) it is flipped horizontally with probability 1/2, boxes with it. The
target holds one row per box -- :data:`TARGET_FIELDS`: label, ``x1 y1 x2 y2`` in input pixels, iscrowd, the
annotation's ``area`` in stored pixels (what COCO's small/medium/large ranges read), and the per-axis scale from
stored to input pixels -- padded to the split's largest box count ``M`` with rows of label ``-1``. A fixed-size
tensor batches with the default collate, moves with ``.to(device)`` and shards under DDP like any other target.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import Dataset

from vpeft.errors import ConfigError, DataError, suggest
from vpeft.files import atomic_write

__all__ = [
    "TARGET_FIELDS",
    "DetectionDataset",
    "DetectionFolder",
    "ImageRecord",
    "SplitRecords",
    "detection_splits",
    "draw_detections",
    "is_detection_folder",
    "load_detection_split",
    "read_detection_split",
    "target_column",
]

logger = logging.getLogger(__name__)

#: the columns of a target row
TARGET_FIELDS: tuple[str, ...] = ("label", "x1", "y1", "x2", "y2", "iscrowd", "area", "scale_x", "scale_y")
_JOINED_VAL = ("val", "valid", "validation")


def target_column(name: str) -> int:
    """The index of ``name`` in :data:`TARGET_FIELDS`."""
    return TARGET_FIELDS.index(name)


# ------------------------------------------------------------------------------------------------ folder format
def _annotation_dir(path: Path) -> Path:
    return Path(path) / "annotations"


def detection_splits(path: str | os.PathLike[str]) -> list[str]:
    """The split names of a detection folder (``annotations/<split>.json``), sorted."""
    adir = _annotation_dir(Path(path))
    return sorted(p.stem for p in adir.glob("*.json")) if adir.is_dir() else []


def is_detection_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds ``annotations/*.json`` (a COCO-format detection folder)."""
    return bool(detection_splits(path))


def _split_names(task_dir: Path, split: str) -> tuple[str, ...]:
    present = detection_splits(task_dir)
    if split == "trainval" and "trainval" not in present:
        val = next((v for v in _JOINED_VAL if v in present), None)
        if "train" in present and val is not None:
            return ("train", val)
    names = tuple(split.split("+"))
    for name in names:
        if name not in present:
            raise DataError(
                f"split {split!r}: {_annotation_dir(task_dir) / (name + '.json')} does not exist; "
                + suggest(name, present or ["none"], "split")
            )
    return names


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, expected a COCO object with images/annotations")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path} has no {key!r} list (a COCO detection file has images, annotations, categories)")
    return data


def _categories(path: Path, data: Mapping[str, Any]) -> tuple[tuple[int, str], ...]:
    seen: dict[int, str] = {}
    for cat in data["categories"]:
        cid, name = cat.get("id") if isinstance(cat, dict) else None, cat.get("name") if isinstance(cat, dict) else None
        if isinstance(cid, bool) or not isinstance(cid, int) or not isinstance(name, str):
            raise DataError(f"{path}: category {cat!r} needs an int 'id' and a str 'name'")
        if cid in seen:
            raise DataError(f"{path}: category id {cid} is listed twice ({seen[cid]!r}, {name!r})")
        seen[cid] = name
    if not seen:
        raise DataError(f"{path} lists no categories")
    return tuple(sorted(seen.items()))


@dataclass(frozen=True)
class DetectionFolder:
    """A COCO-format detection folder and its classes.

    Attributes:
        path: the task folder.
        categories: ``(category id, name)`` of the class-defining split, sorted by id; label ``i`` is entry ``i``.
    """

    path: Path
    categories: tuple[tuple[int, str], ...]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.categories)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def from_dir(cls, task_dir: str | os.PathLike[str]) -> DetectionFolder:
        """The folder's classes from ``annotations/train.json`` (else the first split by name)."""
        path = Path(task_dir)
        splits = detection_splits(path)
        if not splits:
            raise DataError(f"{path} is not a detection folder: it has no annotations/<split>.json")
        source = "train" if "train" in splits else splits[0]
        file = _annotation_dir(path) / f"{source}.json"
        return cls(path, _categories(file, _load_json(file)))

    def splits(self) -> list[str]:
        return detection_splits(self.path)


@dataclass
class ImageRecord:
    """One image of a split: its file, stored size and boxes (``xyxy`` stored pixels, labels ``0..K-1``)."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 xyxy
    labels: np.ndarray  # (n,) int64
    iscrowd: np.ndarray  # (n,) bool
    area: np.ndarray  # (n,) float32, the annotation's area (box area when it has none)


@dataclass
class SplitRecords:
    """The validated images of a split and what was dropped or clipped while reading it."""

    images: list[ImageRecord]
    dropped_zero_area: int = 0
    dropped_outside: int = 0
    clipped: int = 0
    files: list[Path] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return sum(len(r.labels) for r in self.images)


def _image_file(task_dir: Path, split: str, name: str) -> Path | None:
    for base in (task_dir, task_dir / "images" / split, task_dir / "images"):
        candidate = base / name
        if candidate.is_file():
            return candidate
    return None


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as exc:
        raise DataError(f"image {path} cannot be read: {exc}") from None


def _read_one(task_dir: Path, split: str, categories: tuple[tuple[int, str], ...], out: SplitRecords) -> None:
    file = _annotation_dir(task_dir) / f"{split}.json"
    data = _load_json(file)
    mine = _categories(file, data)
    if mine != categories:
        raise DataError(
            f"{file}: categories {[c for c, _ in mine]} differ from the class-defining split's "
            f"{[c for c, _ in categories]} (ids and names must match)"
        )
    label_of = {cid: i for i, (cid, _) in enumerate(categories)}
    images = _image_records(file, data["images"], task_dir, split)
    rows: dict[int, list[tuple[float, float, float, float, int, bool, float]]] = {i: [] for i in images}
    for ann in data["annotations"]:
        row = _box_row(file, ann, images, label_of, out)
        if row is not None:
            rows[ann["image_id"]].append(row)
    for iid, rec in images.items():  # dicts keep the file's image order
        r = rows[iid]
        if r:
            rec.boxes = np.asarray([row[:4] for row in r], np.float32)
            rec.labels = np.asarray([row[4] for row in r], np.int64)
            rec.iscrowd = np.asarray([row[5] for row in r], bool)
            rec.area = np.asarray([row[6] for row in r], np.float32)
        out.images.append(rec)
    out.files.append(file)


def _image_records(file: Path, entries: list[Any], task_dir: Path, split: str) -> dict[int, ImageRecord]:
    """One box-less record per image entry, in file order; each image exists and has the size the file says."""
    images: dict[int, ImageRecord] = {}
    for img in entries:
        iid, name = img.get("id"), img.get("file_name")
        if isinstance(iid, bool) or not isinstance(iid, int) or not isinstance(name, str):
            raise DataError(f"{file}: image entry {img!r} needs an int 'id' and a str 'file_name'")
        if iid in images:
            raise DataError(f"{file}: image id {iid} is listed twice")
        path = _image_file(task_dir, split, name)
        if path is None:
            raise DataError(
                f"{file}: image {name!r} (id {iid}) does not exist under {task_dir} nor {task_dir / 'images' / split}"
            )
        w, h = _header_size(path)
        jw, jh = img.get("width", w), img.get("height", h)
        if (jw, jh) != (w, h):
            raise DataError(f"{file}: image {name!r} is {w}x{h} but the file records width={jw}, height={jh}")
        empty4 = np.zeros((0, 4), np.float32)
        images[iid] = ImageRecord(path, w, h, empty4, np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float32))
    return images


def _box_row(
    file: Path, ann: dict[str, Any], images: dict[int, ImageRecord], label_of: dict[int, int], out: SplitRecords
) -> tuple[float, float, float, float, int, bool, float] | None:
    """``(x1, y1, x2, y2, label, iscrowd, area)`` of one annotation, clipped to its image; ``None`` if dropped.

    Bad entries raise :class:`DataError`; zero-area and wholly outside boxes are counted in ``out`` and dropped.
    """
    aid = ann.get("id", "?")
    iid, cid, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
    if iid not in images:
        raise DataError(f"{file}: annotation {aid} names image_id {iid!r}, which the file does not list")
    if cid not in label_of or isinstance(cid, bool):
        raise DataError(
            f"{file}: annotation {aid} has category_id {cid!r}, not among the categories {sorted(label_of)}"
        )
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    ):
        raise DataError(f"{file}: annotation {aid} has bbox {bbox!r}, expected four finite numbers [x, y, w, h]")
    x, y, bw, bh = (float(v) for v in bbox)
    if bw < 0 or bh < 0:
        raise DataError(f"{file}: annotation {aid} has a box of negative size (bbox {list(bbox)!r})")
    if bw == 0 or bh == 0:
        out.dropped_zero_area += 1
        return None
    rec = images[iid]
    x1, y1 = min(max(x, 0.0), rec.width), min(max(y, 0.0), rec.height)
    x2, y2 = min(max(x + bw, 0.0), rec.width), min(max(y + bh, 0.0), rec.height)
    if x2 <= x1 or y2 <= y1:
        out.dropped_outside += 1
        return None
    if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
        out.clipped += 1
    area = ann.get("area")
    area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) and area > 0 else None
    crowd = bool(ann.get("iscrowd", 0))
    return (x1, y1, x2, y2, label_of[cid], crowd, area if area is not None else (x2 - x1) * (y2 - y1))


def read_detection_split(
    task_dir: str | os.PathLike[str], split: str, folder: DetectionFolder | None = None
) -> SplitRecords:
    """Validate and read ``split`` (``a+b`` and ``trainval`` join files) into :class:`ImageRecord` s.

    Raises:
        DataError: see the module docstring; also a split without images.
    """
    task_dir = Path(task_dir)
    folder = folder or DetectionFolder.from_dir(task_dir)
    out = SplitRecords([])
    before = (0, 0, 0)
    for name in _split_names(task_dir, split):
        _read_one(task_dir, name, folder.categories, out)
        counts = (out.dropped_zero_area, out.dropped_outside, out.clipped)
        zero, outside, clipped = (a - b for a, b in zip(counts, before))
        if zero or outside or clipped:
            logger.warning(
                "%s: dropped %d zero-area box(es) and %d box(es) outside their image, clipped %d box(es) to it",
                out.files[-1], zero, outside, clipped,
            )  # fmt: skip
        before = counts
    if not out.images:
        raise DataError(f"split {split!r} of {task_dir} lists no images")
    return out


# ------------------------------------------------------------------------------------------------------ dataset
def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"detection: size={size!r} must be a positive int (the longer image side, in pixels)")
    return size


class DetectionDataset(Dataset):
    """``split`` of a detection folder as ``(image (3, S, S), target (M, 9))`` items (see the module docstring).

    Args:
        task_dir: the detection folder.
        split: a split name (``a+b`` joins, ``trainval`` = train + val/valid).
        size: ``S``, the canvas side the longer image side is resized to.
        mean, std: per-channel normalisation (the backbone's).
        augment: random horizontal flip (image and boxes), for training.
        folder: the folder's classes (read from the folder when omitted).
    """

    def __init__(
        self,
        task_dir: str | os.PathLike[str],
        split: str,
        size: int,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        augment: bool = False,
        folder: DetectionFolder | None = None,
    ) -> None:
        self.task_dir, self.split, self.size = Path(task_dir), split, _check_size(size)
        self.folder = folder or DetectionFolder.from_dir(self.task_dir)
        self.records = read_detection_split(self.task_dir, split, self.folder)
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = bool(augment)
        self.max_boxes = max(1, max(len(r.labels) for r in self.records.images))

    @property
    def random_augmentation(self) -> bool:
        """Whether items are random (the feature cache then does not apply)."""
        return self.augment

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.folder.class_names

    def __len__(self) -> int:
        return len(self.records.images)

    def scaled_size(self, rec: ImageRecord) -> tuple[int, int]:
        """``(width, height)`` of ``rec`` resized so its longer side is :attr:`size` (aspect ratio kept)."""
        s = self.size / max(rec.width, rec.height)
        return max(1, round(rec.width * s)), max(1, round(rec.height * s))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.records.images[index]
        nw, nh = self.scaled_size(rec)
        with Image.open(rec.path) as im:
            image = im.convert("RGB").resize((nw, nh), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        sx, sy = nw / rec.width, nh / rec.height
        boxes = torch.from_numpy(rec.boxes.copy()) * torch.tensor([sx, sy, sx, sy])
        if self.augment and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
            boxes = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], dim=1)
        canvas = torch.zeros(3, self.size, self.size)
        canvas[:, :nh, :nw] = (x - self.mean) / self.std
        target = torch.zeros(self.max_boxes, len(TARGET_FIELDS))
        target[:, 0] = -1.0
        target[:, 7], target[:, 8] = sx, sy
        n = len(rec.labels)
        if n:
            target[:n, 0] = torch.from_numpy(rec.labels).float()
            target[:n, 1:5] = boxes
            target[:n, 5] = torch.from_numpy(rec.iscrowd).float()
            target[:n, 6] = torch.from_numpy(rec.area)
        return canvas, target


def load_detection_split(
    task_dir: str | os.PathLike[str],
    split: str,
    model_or_cfg: nn.Module | Mapping[str, Any],
    size: int | None = None,
    augment: bool = False,
    folder: DetectionFolder | None = None,
) -> DetectionDataset:
    """One split normalised with the backbone's mean/std at canvas ``size`` (default: the backbone's input side).

    Raises:
        ConfigError: a size that is not a multiple of the ViT's patch size.
        DataError: see :class:`DetectionDataset`.
    """
    source = model_or_cfg
    if isinstance(source, nn.Module):
        source = getattr(source, "backbone", source)  # a task model: its backbone knows the input size
        cfg = getattr(source, "pretrained_cfg", None) or {}
    else:
        cfg = source
    if size is None:
        from vpeft.data.transforms import resolve_input_size

        size = max(resolve_input_size(source))
    patch = getattr(getattr(source, "patch_embed", None), "patch_size", None)
    if patch is not None and (size % patch[0] or size % patch[1]):
        raise ConfigError(f"detection: size {size} is not a multiple of the ViT patch size {patch[0]}x{patch[1]}")
    mean = tuple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_DEFAULT_STD)
    return DetectionDataset(task_dir, split, size, mean=mean, std=std, augment=augment, folder=folder)


# ------------------------------------------------------------------------------------------------------ drawing
#: the colour of the ground-truth boxes in :func:`draw_detections` (predictions take their class's colour)
TRUTH_COLOUR = (255, 255, 255)


def draw_detections(
    image: Image.Image,
    path: str | os.PathLike[str],
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    truth: np.ndarray | None = None,
) -> Path:
    """Write ``image`` with predicted boxes (and the ground truth) drawn on it as a PNG, atomically.

    Args:
        image: the stored image (boxes are in its pixels).
        path: the PNG to write (parent folders are created; written to a temporary file, then renamed).
        boxes: ``(n, 4)`` predicted ``x1 y1 x2 y2``, drawn 2 px wide in their class's ``palette`` colour with
            ``"<class name> <score>"`` above the box (inside it when the box touches the top edge).
        scores, labels: ``(n,)`` scores in [0, 1] and labels ``0..K-1``.
        truth: ``(m, 4)`` true ``x1 y1 x2 y2`` drawn 1 px wide in :data:`TRUTH_COLOUR` beneath the predictions.

    Raises:
        ConfigError: a label without a class name or colour.
    """
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for x1, y1, x2, y2 in np.asarray(truth if truth is not None else np.zeros((0, 4)), np.float64).reshape(-1, 4):
        draw.rectangle([x1, y1, x2, y2], outline=TRUTH_COLOUR, width=1)
    for (x1, y1, x2, y2), score, label in zip(np.asarray(boxes, np.float64).reshape(-1, 4), scores, labels):
        k = int(label)
        if not 0 <= k < min(len(class_names), len(palette)):
            raise ConfigError(f"draw_detections: label {k} has no class name / colour ({len(class_names)} classes)")
        colour = tuple(int(c) for c in palette[k])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{class_names[k]} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1 + 2
        draw.rectangle([x1, ty, x1 + tw + 2, ty + th + 2], fill=colour)
        dark = sum(colour) > 3 * 128
        draw.text((x1 + 1, ty + 1 - top), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font)
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
