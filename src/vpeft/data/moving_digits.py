"""Moving digits: a generated video task whose label is the direction of motion (made offline, in code).

Each clip is a real handwritten digit (scikit-learn's bundled 8x8 digits, ``sklearn.datasets.load_digits``: the
UCI "Optical Recognition of Handwritten Digits" test set) translating in a straight line across a black square
canvas (32x32 by default) for ``frames`` frames (8 by default), ``speed`` 1 or 2 pixels per frame along one of 8
directions (class ``k`` is the angle ``45 * k`` degrees, counter-clockwise from "right"). The clips are exported
in the video folder format of :mod:`vpeft.data.video` as frame folders of lossless grayscale PNGs.

**Every clip comes with its reversal.** Clips are made in pairs: a clip moving in direction ``k`` and the same
frames in reverse order, which is a clip moving in the opposite direction ``(k + 4) % 8`` (a valid clip of the
task, with its own label). The pair holds the *same* frames, bit for bit, so any order-free model -- a frame-wise
backbone with mean pooling over time (TSN), or anything else that sees the set of frames and not their order --
gives the two clips the same prediction, and at most one of them is right: on every split it scores at most 50%
(it can learn the axis of motion from the frames, never its sign), against 100% reachable by a model that sees
the order. 8-way chance is 12.5%; order-free pooling is exactly at chance on the sign. The pairing needs the
sampled frames of a clip and of its reversal to be mirror images: true for the default ``num_frames`` = the clip
length (every frame is read), and for TSN's centred sampling whenever the clip length is an odd multiple of
``num_frames``.

Splits (pairs never straddle splits; the digit images of the test clips are never used in train or val):
``train`` 800 clips, ``val`` 200, ``test`` 1000 (``trainval`` is train + val, joined by the video folder reader);
every class has the same number of clips in each split. The export is deterministic in its seed and atomic
(:func:`ensure_moving_digits_task`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vpeft.errors import DataError

__all__ = [
    "DIRECTIONS",
    "MOVING_DIGITS_SEED",
    "MOVING_DIGITS_SPLIT_SIZES",
    "MOVING_DIGITS_TASK",
    "direction_step",
    "ensure_moving_digits_task",
    "make_clip",
    "opposite",
]

logger = logging.getLogger(__name__)

MOVING_DIGITS_TASK = "moving_digits"
MOVING_DIGITS_SPLIT_SIZES: dict[str, int] = {"train": 800, "val": 200, "test": 1000}
MOVING_DIGITS_SEED = 0
#: class names: class ``k`` moves at ``45 * k`` degrees counter-clockwise from "right" (image y points down)
DIRECTIONS: tuple[str, ...] = ("right", "up_right", "up", "up_left", "left", "down_left", "down", "down_right")
#: scikit-learn's digits shuffled with the seed; the first images make train and val clips, the rest test clips
_TRAIN_VAL_IMAGES = 1000
_DIGIT = 8  # the digits' native size


def direction_step(k: int) -> tuple[int, int]:
    """``(dx, dy)`` in pixels per unit of speed for direction ``k`` (``dy`` positive downwards)."""
    dx = (1, 1, 0, -1, -1, -1, 0, 1)[k]
    dy = (0, -1, -1, -1, 0, 1, 1, 1)[k]
    return dx, dy


def opposite(k: int) -> int:
    """The direction a clip of direction ``k`` moves in when played backwards."""
    return (k + 4) % 8


def make_clip(digit: np.ndarray, direction: int, start: tuple[int, int], speed: int, frames: int, canvas: int):
    """``(frames, canvas, canvas)`` uint8 frames of the 8x8 ``digit`` (values 0..255) pasted with its top-left
    corner at ``start + t * speed * direction_step(direction)`` in frame ``t``.

    Raises:
        DataError: the digit would leave the canvas.
    """
    dx, dy = direction_step(direction)
    out = np.zeros((frames, canvas, canvas), dtype=np.uint8)
    for t in range(frames):
        x, y = start[0] + t * speed * dx, start[1] + t * speed * dy
        if not (0 <= x <= canvas - _DIGIT and 0 <= y <= canvas - _DIGIT):
            raise DataError(f"moving digits: frame {t} at ({x}, {y}) leaves the {canvas}x{canvas} canvas")
        out[t, y : y + _DIGIT, x : x + _DIGIT] = digit
    return out


def _start(rng: np.random.Generator, direction: int, speed: int, frames: int, canvas: int) -> tuple[int, int]:
    """A random start from which the whole path stays on the canvas."""
    travel = (frames - 1) * speed
    room = canvas - _DIGIT
    coords = []
    for step in direction_step(direction):
        low, high = (travel, room) if step < 0 else (0, room - travel * step)
        coords.append(int(rng.integers(low, high + 1)))
    return coords[0], coords[1]


def _pairs(rng: np.random.Generator, images: np.ndarray, pairs: int, frames: int, canvas: int):
    """``pairs`` clips and their reversals: ``[(frames, label), ...]``, forward directions cycling over the 8
    (so each class is as frequent as its opposite, and all classes equally frequent over a split)."""
    out = []
    for i in range(pairs):
        k = i % 8
        speed = int(rng.integers(1, 3))
        digit = images[int(rng.integers(len(images)))]
        clip = make_clip(digit, k, _start(rng, k, speed, frames, canvas), speed, frames, canvas)
        out.append((clip, k))
        out.append((clip[::-1], opposite(k)))
    return out


def _write_task(out: Path, seed: int, frames: int, canvas: int) -> None:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    images = np.clip(np.rint(load_digits().images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    order = rng.permutation(len(images))
    pools = {"train": images[order[:_TRAIN_VAL_IMAGES]], "test": images[order[_TRAIN_VAL_IMAGES:]]}
    pools["val"] = pools["train"]
    for split, size in MOVING_DIGITS_SPLIT_SIZES.items():
        lines = []
        for n, (clip, label) in enumerate(_pairs(rng, pools[split], size // 2, frames, canvas)):
            folder = out / "clips" / split / f"{n:04d}"
            folder.mkdir(parents=True)
            for t, frame in enumerate(clip):
                Image.fromarray(frame).save(folder / f"{t:02d}.png", compress_level=1)
            lines.append(f"clips/{split}/{n:04d} {label}")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "classes.txt").write_text("\n".join(DIRECTIONS) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_README.format(seed=seed, frames=frames, canvas=canvas), encoding="utf-8")


_README = """# moving_digits (video folder: frame folders of PNGs)

Generated by `vpeft.data.moving_digits.ensure_moving_digits_task` (seed {seed}) from scikit-learn's bundled
digits (`sklearn.datasets.load_digits`; Alpaydin & Kaynak, 1998). Each clip: one 8x8 digit translating on a black
{canvas}x{canvas} canvas for {frames} frames, 1 or 2 pixels per frame; the label (classes.txt) is the direction of
motion. Clip 2i+1 of every list is clip 2i reversed (the opposite direction), so an order-free model scores at
most 50%. train 800 / val 200 / test 1000 clips; test clips use digit images not used in train or val.
"""


def _is_complete(task_dir: Path) -> bool:
    if not (task_dir / "classes.txt").is_file():
        return False
    for split, size in MOVING_DIGITS_SPLIT_SIZES.items():
        path = task_dir / f"{split}.txt"
        if not path.is_file() or len(path.read_text(encoding="utf-8").splitlines()) != size:
            return False
    return True


def _checked_existing(task_dir: Path) -> Path:
    if not _is_complete(task_dir):
        expected = ", ".join(f"{s}.txt ({n} lines)" for s, n in MOVING_DIGITS_SPLIT_SIZES.items())
        raise DataError(
            f"{task_dir} exists but is not a complete moving-digits export (expected classes.txt, {expected}); "
            "delete it to re-export"
        )
    return task_dir


def ensure_moving_digits_task(
    root: str | Path, *, seed: int = MOVING_DIGITS_SEED, frames: int = 8, canvas: int = 32
) -> Path:
    """Export the moving-digits task to ``root/moving_digits`` unless it is there, and return that folder.

    Atomic like :func:`vpeft.data.ensure_digits_task` (written into a hidden temporary folder, then renamed into
    place); deterministic in ``seed``.

    Args:
        root: The data root (created if missing).
        seed: The generator's seed (digit images, speeds, starts).
        frames: Frames per clip (>= 2).
        canvas: The square canvas side in pixels; a 2-pixel-per-frame path of ``frames`` frames must fit.

    Raises:
        DataError: bad ``frames`` / ``canvas``, or ``root/moving_digits`` exists but is not a complete export.
    """
    for name, value, low in (("frames", frames, 2), ("canvas", canvas, _DIGIT)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"moving digits: {name}={value!r} must be an int >= {low}")
    if _DIGIT + 2 * (frames - 1) > canvas:
        raise DataError(
            f"moving digits: {frames} frames at 2 px per frame do not fit an 8x8 digit on a {canvas}x{canvas} "
            f"canvas; use canvas >= {_DIGIT + 2 * (frames - 1)}"
        )
    root = Path(root).expanduser()
    task_dir = root / MOVING_DIGITS_TASK
    if task_dir.exists():
        return _checked_existing(task_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MOVING_DIGITS_TASK}.tmp-", dir=root))
    try:
        _write_task(tmp, seed, frames, canvas)
        tmp.rename(task_dir)
    except OSError:
        if task_dir.exists():  # another process finished first
            return _checked_existing(task_dir)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported moving digits to %s (%s)", task_dir, MOVING_DIGITS_SPLIT_SIZES)
    return task_dir
