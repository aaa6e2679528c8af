"""Export scikit-learn's bundled digits as a VTAB-1k-format task (no download needed).

The data is the UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak, 1998) shipped
inside scikit-learn: 1797 grayscale 8x8 images, 10 classes, pixel values 0..16.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vpeft.data.vtab import SPLITS
from vpeft.errors import DataError

__all__ = ["DIGITS_SPLIT_SIZES", "DIGITS_SEED", "ensure_digits_task"]

logger = logging.getLogger(__name__)

DIGITS_SPLIT_SIZES: dict[str, int] = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
DIGITS_SEED = 0
TASK_NAME = "digits"

_README = """# digits (VTAB-1k format)

Source: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" data
(`sklearn.datasets.load_digits`; Alpaydin & Kaynak, 1998). 1797 grayscale 8x8 images, 10 classes.
Pixel values 0..16 are scaled to 0..255 and saved as PNG at their native 8x8 size (the model's transform
resizes them).

Split: stratified by class with a fixed seed ({seed}): train800: 800; val200: 200; train800val200: 1000
(their union); test: 797 (all remaining images).
Lines are `<path relative to this folder> <label index>`; labels index classes.txt.
Exported by `vpeft.data.ensure_digits_task`.
"""


def _is_complete(task_dir: Path) -> bool:
    """Whether every list file exists with the expected number of lines, and classes.txt exists."""
    if not (task_dir / "classes.txt").is_file():
        return False
    for split, size in DIGITS_SPLIT_SIZES.items():
        path = task_dir / f"{split}.txt"
        if not path.is_file() or len(path.read_text(encoding="utf-8").splitlines()) != size:
            return False
    return True


def _split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified train800 / val200 / test split of the digits indices, deterministic in ``seed``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    n_test = DIGITS_SPLIT_SIZES["test"]
    trainval, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=seed)
    train, val = train_test_split(
        trainval, test_size=DIGITS_SPLIT_SIZES["val200"], stratify=labels[trainval], random_state=seed
    )
    train, val, test = np.sort(train), np.sort(val), np.sort(test)
    return {"train800": train, "val200": val, "train800val200": np.concatenate([train, val]), "test": test}


def _write_task(out: Path, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
    """Write images, lists, classes.txt and README.md into the (empty) folder ``out``."""
    (out / "images").mkdir()
    pixels = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(out / "images" / f"{i:04d}.png")
    for split, indices in _split_indices(labels, seed).items():
        lines = [f"images/{i:04d}.png {int(labels[i])}" for i in indices]
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "classes.txt").write_text("\n".join(str(c) for c in range(10)) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_README.format(seed=seed), encoding="utf-8")


def ensure_digits_task(root: str | Path) -> Path:
    """Export the digits task to ``root/digits`` unless it is already there, and return that folder.

    The export is atomic: everything is written into a temporary folder next to the target, which is then
    renamed into place, so an interrupted run never leaves a half-written task (a killed run may leave a
    hidden ``.digits.tmp-*`` folder behind, which is safe to delete).

    Args:
        root: The data root (created if missing), e.g. :func:`vpeft.data.default_data_root`.

    Returns:
        The task folder ``root/digits``.

    Raises:
        DataError: ``root/digits`` exists but is not a complete export (delete it to re-export).
    """
    root = Path(root).expanduser()
    task_dir = root / TASK_NAME
    if task_dir.exists():
        return _checked_existing(task_dir)
    root.mkdir(parents=True, exist_ok=True)
    from sklearn.datasets import load_digits

    digits = load_digits()
    tmp = Path(tempfile.mkdtemp(prefix=f".{TASK_NAME}.tmp-", dir=root))
    try:
        _write_task(tmp, digits.images, digits.target, DIGITS_SEED)
        tmp.rename(task_dir)
    except OSError:
        if task_dir.exists():  # another process finished first
            return _checked_existing(task_dir)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported scikit-learn digits to %s (%s)", task_dir, DIGITS_SPLIT_SIZES)
    return task_dir


def _checked_existing(task_dir: Path) -> Path:
    if not _is_complete(task_dir):
        expected = ", ".join(f"{s}.txt ({DIGITS_SPLIT_SIZES[s]} lines)" for s in SPLITS)
        raise DataError(
            f"{task_dir} exists but is not a complete digits export (expected classes.txt, {expected}); "
            "delete it to re-export"
        )
    logger.debug("digits task already present at %s", task_dir)
    return task_dir
