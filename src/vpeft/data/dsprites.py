"""Procedurally generated dSprites tasks in VTAB-1k format: ``dsprites_loc`` and ``dsprites_ori``.

dSprites (Matthey et al., 2017, https://github.com/deepmind/dsprites-dataset) is the full factor grid of 2-D
sprites: 3 shapes (square, ellipse, heart) x 6 scales (linspace(0.5, 1)) x 40 orientations
(linspace(0, 2 pi), both ends included as in the original) x 32 x 32 positions (linspace(0, 1) each),
rendered as 64 x 64 binary images: 737,280 images in all. VTAB (Zhai et al., 2019) uses two of its factors
as classification tasks of its *structured* group, each with 16 classes:

* ``dsprites_loc``: the x position, 32 values binned two by two -> 16 classes;
* ``dsprites_ori``: the orientation, 40 values binned by ``floor(index / 2.5)`` -> 16 classes (VTAB's
  ``class_division_factor``). Orientation is ambiguous for the symmetric shapes, as in the original data.

The generator samples distinct points of the factor grid with a fixed seed and renders each sprite by testing
pixel centres against the shape's implicit form (no anti-aliasing: binary images, like the original). The shapes
follow the original's look (square, 2:1 ellipse, heart) but are not pixel-identical to its sprite sheet.
Splits: ``train800`` (800), ``val200`` (200), ``train800val200`` (their union) and ``test`` (1000 by default),
disjoint, drawn from the same grid sample.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vpeft.errors import DataError, suggest

__all__ = [
    "DSPRITES_TASKS",
    "DSPRITES_SEED",
    "FACTOR_SIZES",
    "dsprites_factor_values",
    "ensure_dsprites_task",
    "render_sprite",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
FACTOR_SIZES: dict[str, int] = {"shape": 3, "scale": 6, "orientation": 40, "pos_x": 32, "pos_y": 32}
SHAPES = ("square", "ellipse", "heart")
DSPRITES_SEED = 0
NUM_CLASSES = 16
# task name -> (factor whose bin is the label, seed offset so the two tasks draw different grid points)
DSPRITES_TASKS: dict[str, tuple[str, int]] = {"dsprites_loc": ("pos_x", 0), "dsprites_ori": ("orientation", 1)}

_HALF_SIZE = 10.0  # half side of the square at scale 1, in pixels
_MARGIN = 12.0  # sprite centres span [_MARGIN, 63 - _MARGIN] pixels over positions 0..1


def dsprites_factor_values() -> dict[str, np.ndarray]:
    """The published factor values of dSprites (shape is categorical: 0 square, 1 ellipse, 2 heart)."""
    return {
        "shape": np.arange(3),
        "scale": np.linspace(0.5, 1.0, 6),
        "orientation": np.linspace(0.0, 2 * np.pi, 40),
        "pos_x": np.linspace(0.0, 1.0, 32),
        "pos_y": np.linspace(0.0, 1.0, 32),
    }


def render_sprite(shape: int, scale: float, orientation: float, pos_x: float, pos_y: float) -> np.ndarray:
    """Render one sprite as a 64 x 64 ``uint8`` image (0 background, 255 sprite).

    Args:
        shape: 0 square, 1 ellipse, 2 heart.
        scale: Size factor, 0.5..1.
        orientation: Rotation in radians (counter-clockwise).
        pos_x: Horizontal position, 0 (left) .. 1 (right).
        pos_y: Vertical position, 0 (top) .. 1 (bottom).
    """
    span = IMAGE_SIZE - 1 - 2 * _MARGIN
    cx, cy = _MARGIN + pos_x * span, _MARGIN + pos_y * span
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    dx, dy = xs - cx, cy - ys  # y up
    c, s = np.cos(orientation), np.sin(orientation)
    half = _HALF_SIZE * scale
    u, v = (c * dx + s * dy) / half, (-s * dx + c * dy) / half  # rotate the pixel grid by -orientation
    if shape == 0:
        inside = np.maximum(np.abs(u), np.abs(v)) <= 1.0
    elif shape == 1:
        inside = u**2 + (v / 0.5) ** 2 <= 1.0
    elif shape == 2:
        hu, hv = u * 1.1, v * 1.1 + 0.1  # the heart curve spans about [-1.14, 1.14] x [-1, 1.25]
        inside = (hu**2 + hv**2 - 1.0) ** 3 - hu**2 * hv**3 <= 0.0
    else:
        raise DataError(f"dSprites shape index must be 0 (square), 1 (ellipse) or 2 (heart), got {shape!r}")
    return np.where(inside, 255, 0).astype(np.uint8)


def _label(task: str, factors: dict[str, int]) -> int:
    factor, _ = DSPRITES_TASKS[task]
    return factors[factor] * NUM_CLASSES // FACTOR_SIZES[factor]


def _sample_grid(n: int, seed: int) -> list[dict[str, int]]:
    """``n`` distinct points of the factor grid (as factor indices), deterministic in ``seed``."""
    sizes = list(FACTOR_SIZES.values())
    flat = np.random.default_rng(seed).choice(int(np.prod(sizes)), size=n, replace=False)
    indices = np.unravel_index(flat, sizes)
    return [{name: int(idx[i]) for name, idx in zip(FACTOR_SIZES, indices)} for i in range(n)]


def split_sizes(test_size: int) -> dict[str, int]:
    return {"train800": 800, "val200": 200, "train800val200": 1000, "test": test_size}


def _write_task(out: Path, task: str, seed: int, test_size: int) -> None:
    values = dsprites_factor_values()
    points = _sample_grid(1000 + test_size, seed)
    (out / "images").mkdir()
    rows, factor_lines = [], ["# image shape scale orientation pos_x pos_y (factor indices)"]
    for i, f in enumerate(points):
        img = render_sprite(*(values[k][f[k]] for k in FACTOR_SIZES))
        rel = f"images/{i:05d}.png"
        Image.fromarray(img, mode="L").save(out / rel)
        rows.append(f"{rel} {_label(task, f)}")
        factor_lines.append(f"{rel} " + " ".join(str(f[k]) for k in FACTOR_SIZES))
    splits = {"train800": rows[:800], "val200": rows[800:1000], "train800val200": rows[:1000], "test": rows[1000:]}
    for split, lines in splits.items():
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    factor, _ = DSPRITES_TASKS[task]
    (out / "classes.txt").write_text("\n".join(f"{factor}_bin{c:02d}" for c in range(NUM_CLASSES)) + "\n")
    (out / "factors.txt").write_text("\n".join(factor_lines) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(task, seed, test_size), encoding="utf-8")


def _readme(task: str, seed: int, test_size: int) -> str:
    factor, _ = DSPRITES_TASKS[task]
    return (
        f"# {task} (VTAB-1k format, generated)\n\n"
        "Procedural dSprites (Matthey et al., 2017): the published factor grid 3 shapes x 6 scales x 40 "
        "orientations x 32 x 32 positions, 64x64 binary images, rendered by `vpeft.data.dsprites`.\n"
        f"Label: the {factor} factor index binned into {NUM_CLASSES} classes (as VTAB's structured group).\n"
        f"Grid points sampled without replacement, seed {seed}. Splits: train800 800, val200 200, "
        f"train800val200 1000 (their union), test {test_size}, disjoint. factors.txt lists every image's factors.\n"
    )


def _is_complete(task_dir: Path, test_size: int) -> bool:
    if not (task_dir / "classes.txt").is_file():
        return False
    for split, size in split_sizes(test_size).items():
        path = task_dir / f"{split}.txt"
        if not path.is_file() or len(path.read_text(encoding="utf-8").splitlines()) != size:
            return False
    return True


def ensure_dsprites_task(root: str | Path, task: str, *, test_size: int = 1000, seed: int = DSPRITES_SEED) -> Path:
    """Generate ``root/<task>`` (``dsprites_loc`` or ``dsprites_ori``) unless present, and return that folder.

    Atomic like :func:`vpeft.data.ensure_digits_task`: written into a hidden temporary folder beside the target,
    then renamed into place, so an interrupted run never leaves a half-written task.

    Args:
        root: The data root (created if missing).
        task: ``dsprites_loc`` (x position, 16 bins) or ``dsprites_ori`` (orientation, 16 bins).
        test_size: Images in the test split (>= 1).
        seed: Seed of the grid sample (the task's own offset is added).

    Raises:
        DataError: Unknown task, bad ``test_size``, or an existing folder that is not a complete export.
    """
    if task not in DSPRITES_TASKS:
        raise DataError(suggest(task, DSPRITES_TASKS, "dSprites task"))
    if isinstance(test_size, bool) or not isinstance(test_size, int) or test_size < 1:
        raise DataError(f"dSprites test_size must be an int >= 1, got {test_size!r}")
    root = Path(root).expanduser()
    task_dir = root / task
    if task_dir.exists():
        return _checked_existing(task_dir, test_size)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}.tmp-", dir=root))
    try:
        _write_task(tmp, task, seed + DSPRITES_TASKS[task][1], test_size)
        tmp.rename(task_dir)
    except OSError:
        if task_dir.exists():  # another process finished first
            return _checked_existing(task_dir, test_size)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated %s at %s", task, task_dir)
    return task_dir


def _checked_existing(task_dir: Path, test_size: int) -> Path:
    if not _is_complete(task_dir, test_size):
        expected = ", ".join(f"{s}.txt ({n} lines)" for s, n in split_sizes(test_size).items())
        raise DataError(
            f"{task_dir} exists but is not a complete dSprites export (expected classes.txt, {expected}); "
            "delete it to regenerate"
        )
    return task_dir
