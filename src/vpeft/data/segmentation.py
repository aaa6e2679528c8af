"""Semantic-segmentation task folders: image/mask pairs, joint transforms, validation, colour overlays.

Folder format (the layout of the CamVid SegNet release, Brostow et al. 2009 / Badrinarayanan et al. 2017, as
stored under ``shared/data/seg/camvid``)::

    <task>/
        classes.txt          one class name per line; line i names class index i
        train.txt            one "<image> <mask>" pair of relative paths per line (no spaces in paths)
        val.txt              the validation split (choose hyper-parameters here)
        test.txt             the test split (read once)
        images/..., masks/...

Masks are 8-bit single-channel PNGs (mode ``L`` or ``P``) of class indices ``0..K-1``, with 255 = void (ignored
by the loss and the metric). The protocol mirrors VTAB-1k's: tune on ``train`` / ``val``, retrain on ``trainval``
(``train.txt`` + ``val.txt``; any ``a+b`` joins lists the same way), evaluate ``test`` once.

A dataset validates every pair up front, cheaply and vectorised: both files exist, the mask is 8-bit
single-channel and the same size as its image (read from the PNG/JPEG header), and its values (one
``numpy.bincount`` per mask) are class indices or 255; anything else raises :class:`~vpeft.errors.DataError`
naming the file, the value and what was expected. Items are ``(image (3, H, W) float32 normalised, mask (H, W)
int64)``, image and mask transformed jointly: resized to the input size (image bilinear, mask nearest), or,
for training with ``augment=True``, randomly rescaled (factor in ``scale_range``), randomly cropped to the input
size (padded with void where smaller) and horizontally flipped (the usual mmsegmentation training pipeline,
off by default like VTAB's protocol).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import Dataset

from vpeft.data.lists import list_files, present_splits
from vpeft.data.transforms import resolve_input_size
from vpeft.errors import ConfigError, DataError
from vpeft.files import atomic_write

__all__ = [
    "SEG_SPLITS",
    "VOID",
    "SegmentationDataset",
    "SegmentationFolder",
    "default_palette",
    "is_segmentation_folder",
    "load_segmentation_split",
    "read_pairs",
    "save_legend",
    "save_overlay",
]

logger = logging.getLogger(__name__)

SEG_SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
VOID = 255
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


# ------------------------------------------------------------------------------------------------ folder format
def _first_line(path: Path) -> str | None:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except (OSError, UnicodeDecodeError):
        return None
    return None


def is_segmentation_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a segmentation task folder: a ``train.txt`` of ``image mask`` lines (its ``classes.txt``
    is checked when the folder is read, so a folder lacking it is named as a segmentation folder without one).

    A VTAB-1k folder's lines are ``<image> <label index>`` (second field an integer), so the two never match.
    """
    path = Path(path)
    if not (path / "train.txt").is_file():
        return False
    line = _first_line(path / "train.txt")
    if line is None:
        return False
    fields = line.split()
    return len(fields) == 2 and not fields[1].lstrip("-").isdigit() and fields[1].lower().endswith(_IMAGE_SUFFIXES)


def read_pairs(task_dir: str | os.PathLike[str], split: str) -> list[tuple[Path, Path]]:
    """The ``(image, mask)`` absolute paths of ``split`` (``trainval`` and ``a+b`` join lists), in file order.

    Raises:
        DataError: a missing list (the message names the lists present), a malformed line, a missing file.
    """
    task_dir = Path(task_dir)
    pairs: list[tuple[Path, Path]] = []
    for list_file in list_files(task_dir, split, SEG_SPLITS):
        for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2:
                raise DataError(
                    f"malformed line {list_file.name}:{lineno}: {line!r}; expected '<image path> <mask path>'"
                )
            image, mask = task_dir / fields[0], task_dir / fields[1]
            for kind, file in (("image", image), ("mask", mask)):
                if not file.is_file():
                    raise DataError(f"{kind} {file} listed at {list_file.name}:{lineno} does not exist")
            pairs.append((image, mask))
    if not pairs:
        raise DataError(f"split {split!r} of {task_dir} lists no image/mask pairs")
    return pairs


def _read_classes(task_dir: Path) -> tuple[str, ...]:
    path = task_dir / "classes.txt"
    if not path.is_file():
        raise DataError(
            f"segmentation folder {task_dir} (train.txt lists image/mask pairs) has no classes.txt: add it with one "
            "class name per line (line i names mask value i)"
        )
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise DataError(f"{path} is empty; list one class name per line")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path} names class {dup!r} twice; class names must be unique")
    if len(names) >= VOID:
        raise DataError(f"{path} lists {len(names)} classes; 8-bit masks hold at most {VOID} (255 is void)")
    return names


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as m:
            if m.mode not in ("L", "P"):
                raise DataError(
                    f"mask {path} has PIL mode {m.mode!r}; expected an 8-bit single-channel PNG of class indices "
                    f"(mode 'L' or 'P', {VOID} = void)"
                )
            return np.asarray(m, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"mask {path} cannot be read as an image: {exc}") from None


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header (no decoding)."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError as exc:
        raise DataError(f"image {path} cannot be read: {exc}") from None


def validate_pairs(pairs: Sequence[tuple[Path, Path]], num_classes: int, classes_file: Path) -> np.ndarray:
    """Check every mask against its image and the classes; return the pixel count per class over all masks.

    Raises:
        DataError: mask size differs from its image, or a mask value is neither a class index nor 255.
    """
    counts = np.zeros(256, dtype=np.int64)
    allowed = np.zeros(256, dtype=bool)
    allowed[:num_classes] = True
    allowed[VOID] = True
    for image, mask in pairs:
        arr = _read_mask(mask)
        w, h = _image_size(image)
        if arr.shape != (h, w):
            raise DataError(
                f"mask {mask} is {arr.shape[1]}x{arr.shape[0]} but its image {image.name} is {w}x{h}; "
                "a mask must have its image's size"
            )
        c = np.bincount(arr.ravel(), minlength=256)
        bad = np.flatnonzero((c > 0) & ~allowed)
        if bad.size:
            raise DataError(
                f"mask {mask} holds the value {int(bad[0])}, neither a class index 0..{num_classes - 1} "
                f"({classes_file} lists {num_classes} classes) nor {VOID} (void)"
            )
        counts += c
    return counts[:num_classes]


@dataclass(frozen=True)
class SegmentationFolder:
    """A segmentation task folder (see the module docstring).

    Attributes:
        task_dir: the folder.
        class_names: from ``classes.txt``.
    """

    task_dir: Path
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def name(self) -> str:
        return self.task_dir.name

    @classmethod
    def from_dir(cls, task_dir: str | os.PathLike[str]) -> SegmentationFolder:
        """Describe ``task_dir``. Raises DataError if it is not a segmentation folder or ``classes.txt`` is bad."""
        task_dir = Path(task_dir)
        if not task_dir.is_dir():
            raise DataError(f"segmentation folder {task_dir} does not exist")
        if not is_segmentation_folder(task_dir):
            raise DataError(
                f"{task_dir} is not a segmentation folder: expected train.txt with '<image> <mask>' lines "
                "and classes.txt"
            )
        return cls(task_dir=task_dir, class_names=_read_classes(task_dir))

    def splits(self) -> list[str]:
        """The splits whose lists exist, in :data:`SEG_SPLITS` order."""
        return present_splits(self.task_dir, SEG_SPLITS)

    def dataset(self, split: str, **kwargs: Any) -> SegmentationDataset:
        """The dataset of one split (keyword arguments as :class:`SegmentationDataset`)."""
        return SegmentationDataset(self.task_dir, split, **kwargs)


# -------------------------------------------------------------------------------------------------------- dataset
def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, size
    if isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise ConfigError(f"size must be a positive int or an (height, width) pair, got {size!r}")


class SegmentationDataset(Dataset):
    """One split of a segmentation folder as ``(image, mask)`` pairs.

    Args:
        task_dir: the folder.
        split: ``train``, ``val``, ``trainval``, ``test`` or ``a+b`` joins of lists.
        size: ``(H, W)`` (or one int) the images and masks are resized to (multiples of the patch for ViTs).
        mean, std: per-channel normalisation (the backbone's).
        augment: random rescale + crop + horizontal flip (training only; off by default).
        scale_range: rescale factors drawn uniformly for ``augment``.
        native_masks: keep masks at their stored size (evaluation at the original resolution: the logits are
            resampled to the mask); needs all masks of one size to batch, and ``augment=False``.
        validate: check every pair up front (see :func:`validate_pairs`).

    Attributes:
        class_names, num_classes, pairs, class_pixels (labelled pixels per class over the split, when validated).
    """

    def __init__(
        self,
        task_dir: str | os.PathLike[str],
        split: str,
        size: int | Sequence[int],
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        augment: bool = False,
        scale_range: tuple[float, float] = (0.5, 2.0),
        native_masks: bool = False,
        validate: bool = True,
    ) -> None:
        folder = SegmentationFolder.from_dir(task_dir)
        self.task_dir, self.split = folder.task_dir, split
        self.class_names, self.num_classes = folder.class_names, folder.num_classes
        self.size = _size_pair(size)
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std need 3 values (RGB), got {mean!r} and {std!r}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ConfigError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        if native_masks and augment:
            raise ConfigError("native_masks is for evaluation; it cannot be combined with augment=True")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment, self.scale_range, self.native_masks = augment, tuple(scale_range), native_masks
        self.pairs = read_pairs(self.task_dir, split)
        self.class_pixels = (
            validate_pairs(self.pairs, self.num_classes, self.task_dir / "classes.txt") if validate else None
        )
        logger.debug("segmentation %s/%s: %d pairs, %d classes", folder.name, split, len(self), self.num_classes)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def random_augmentation(self) -> bool:
        """Whether items are random (training augmentation): features of such a split cannot be cached."""
        return self.augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = im.convert("RGB")
        mask = Image.fromarray(_read_mask(mask_path))
        if image.size != mask.size:
            raise DataError(f"mask {mask_path} is {mask.size} but its image is {image.size}")
        if self.augment:
            return self._augmented(image, mask)
        h, w = self.size
        x = self._normalise(image.resize((w, h), Image.BILINEAR))
        m = mask if self.native_masks else mask.resize((w, h), Image.NEAREST)
        return x, torch.from_numpy(np.array(m, dtype=np.int64))

    def _normalise(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def _augmented(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.size
        low, high = self.scale_range
        s = low + (high - low) * float(torch.rand(()))
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        x = self._normalise(image.resize((sw, sh), Image.BILINEAR))
        m = torch.from_numpy(np.array(mask.resize((sw, sh), Image.NEAREST), dtype=np.int64))
        ph, pw = max(0, h - sh), max(0, w - sw)
        if ph or pw:  # pad: zeros (the mean colour) for the image, void for the mask
            x = torch.nn.functional.pad(x, (0, pw, 0, ph))
            m = torch.nn.functional.pad(m, (0, pw, 0, ph), value=VOID)
        top = int(torch.randint(0, x.shape[1] - h + 1, ()))
        left = int(torch.randint(0, x.shape[2] - w + 1, ()))
        x, m = x[:, top : top + h, left : left + w], m[top : top + h, left : left + w]
        if float(torch.rand(())) < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        return x.contiguous(), m.contiguous()


def load_segmentation_split(
    task_dir: str | os.PathLike[str],
    split: str,
    model_or_cfg: nn.Module | Mapping[str, Any],
    size: int | Sequence[int] | None = None,
    augment: bool = False,
    native_masks: bool = False,
) -> SegmentationDataset:
    """One split normalised with the backbone's mean/std, at ``size`` (default: the backbone's input size).

    Args:
        task_dir: the segmentation folder.
        split: see :class:`SegmentationDataset`.
        model_or_cfg: the backbone (or task model, or a ``pretrained_cfg`` mapping): mean, std, input size.
        size: ``(H, W)`` or one int; for a ViT both must be multiples of the patch size.
        augment, native_masks: see :class:`SegmentationDataset`.

    Raises:
        ConfigError: a size that is not a multiple of the ViT's patch size.
        DataError: see :class:`SegmentationDataset`.
    """
    source = model_or_cfg
    if isinstance(source, nn.Module):
        source = getattr(source, "backbone", source)  # a task model: its backbone knows the input size
        cfg = getattr(source, "pretrained_cfg", None) or {}
    else:
        cfg = source
    hw = _size_pair(size) if size is not None else resolve_input_size(source)
    patch = getattr(getattr(source, "patch_embed", None), "patch_size", None)
    if patch is not None and (hw[0] % patch[0] or hw[1] % patch[1]):
        raise ConfigError(f"size {hw[0]}x{hw[1]} is not a multiple of the ViT patch size {patch[0]}x{patch[1]}")
    mean = tuple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_DEFAULT_STD)
    return SegmentationDataset(task_dir, split, hw, mean=mean, std=std, augment=augment, native_masks=native_masks)


# -------------------------------------------------------------------------------------------------------- overlays
def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """A distinct colour per class: the PASCAL VOC colour map (bits of the index spread over R, G, B)."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i + 1  # skip black, which would hide class 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def _image_array(image: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """``image`` (PIL, uint8 HxWx3 array, or float (3, H, W) tensor/array, normalised if mean/std given) as uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 3:
        return arr
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ConfigError(f"save_overlay: image of shape {arr.shape}; expected (3, H, W) floats or (H, W, 3) uint8")
    if mean is not None and std is not None:
        arr = arr * np.asarray(std, dtype=np.float32).reshape(3, 1, 1) + np.asarray(mean, np.float32).reshape(3, 1, 1)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def save_overlay(
    image: Any,
    mask: Any,
    path: str | os.PathLike[str],
    palette: Sequence[Sequence[int]] | None = None,
    alpha: float = 0.5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Write ``image`` blended with the colour of each pixel's class in ``mask`` as a PNG, atomically.

    Args:
        image: a PIL image, an ``(H, W, 3)`` uint8 array, or a ``(3, H, W)`` float tensor in [0, 1] (or
            normalised: pass the ``mean`` / ``std`` it was normalised with).
        mask: ``(h, w)`` class indices (tensor or array; predictions or ground truth); 255 (void) and indices
            without a palette colour are left transparent. Resized (nearest) to the image if needed.
        path: the PNG to write (parent folders are created; written to a temporary file, then renamed).
        palette: one ``(r, g, b)`` per class (default :func:`default_palette`).
        alpha: weight of the class colour, in [0, 1].

    Returns:
        The path written.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"save_overlay: alpha={alpha!r} must be in [0, 1]")
    rgb = _image_array(image, mean, std)
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim != 2:
        raise ConfigError(f"save_overlay: mask of shape {m.shape}; expected (H, W) class indices")
    if m.shape != rgb.shape[:2]:
        m = np.asarray(Image.fromarray(m.astype(np.int32)).resize(rgb.shape[1::-1], Image.NEAREST))
    m = m.astype(np.int64)
    colours = np.asarray(palette if palette is not None else default_palette(max(int(m.max(initial=0)) + 1, 1)))
    colours = colours.reshape(-1, 3).astype(np.float32)
    coloured = (m >= 0) & (m < len(colours)) & (m != VOID)
    out = rgb.astype(np.float32)
    out[coloured] = (1.0 - alpha) * out[coloured] + alpha * colours[m[coloured]]
    return _write_png(Image.fromarray((out + 0.5).clip(0, 255).astype(np.uint8)), path)


def _write_png(image: Image.Image, path: str | os.PathLike[str], info: Any = None) -> Path:
    """Save ``image`` as a PNG at ``path`` atomically (:func:`vpeft.files.atomic_write`: the umask's mode)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


#: Geometry of :func:`save_legend` (pixels): the margin, the square swatch's side, and one row per class.
LEGEND_MARGIN, LEGEND_SWATCH, LEGEND_ROW = 8, 16, 22


def _legend_font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14)  # Pillow's bundled FreeType font
    except (TypeError, ValueError, OSError, ImportError):  # an old Pillow or one built without FreeType
        return ImageFont.load_default()


def save_legend(
    class_names: Sequence[str], path: str | os.PathLike[str], palette: Sequence[Sequence[int]] | None = None
) -> Path:
    """Write the colour legend of :func:`save_overlay`'s overlays as a PNG, atomically: one row per class, its
    colour swatch and ``"<index> <name>"``, on white.

    Row ``i`` (from 0) holds class ``i``'s swatch at ``x, y`` in ``[LEGEND_MARGIN, LEGEND_MARGIN + LEGEND_SWATCH)``
    and ``[LEGEND_MARGIN + i * LEGEND_ROW, ... + LEGEND_SWATCH)``; the name follows it. The PNG's ``classes`` text
    chunk holds the same as JSON: ``[{"index", "name", "rgb"}, ...]``.

    Args:
        class_names: the names of classes 0..K-1 (``classes.txt``).
        path: the PNG to write.
        palette: one ``(r, g, b)`` per class (default :func:`default_palette`, the overlays' default).

    Returns:
        The path written.
    """
    import json

    from PIL import ImageDraw, PngImagePlugin

    names = [str(n) for n in class_names]
    colours = [tuple(int(v) for v in c) for c in (palette if palette is not None else default_palette(len(names)))]
    if len(colours) < len(names):
        raise ConfigError(f"save_legend: {len(names)} classes but a palette of {len(colours)} colours")
    font = _legend_font()
    labels = [f"{i} {name}" for i, name in enumerate(names)]
    text_x = LEGEND_MARGIN + LEGEND_SWATCH + LEGEND_MARGIN
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = text_x + max((int(measure.textlength(t, font=font)) for t in labels), default=0) + LEGEND_MARGIN
    height = 2 * LEGEND_MARGIN + max(len(names), 1) * LEGEND_ROW - (LEGEND_ROW - LEGEND_SWATCH)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, (label, colour) in enumerate(zip(labels, colours)):
        top = LEGEND_MARGIN + i * LEGEND_ROW
        draw.rectangle([LEGEND_MARGIN, top, LEGEND_MARGIN + LEGEND_SWATCH - 1, top + LEGEND_SWATCH - 1], fill=colour)
        draw.text((text_x, top), label, fill=(0, 0, 0), font=font)
    info = PngImagePlugin.PngInfo()
    rows = [{"index": i, "name": n, "rgb": list(c)} for i, (n, c) in enumerate(zip(names, colours))]
    info.add_text("classes", json.dumps(rows))
    return _write_png(image, path, info)
