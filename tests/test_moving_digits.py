"""The generated moving-digits video task: labels are the direction of motion (recovered here from the frames'
centroids), every clip's reversal is in its split with the opposite label (so an order-free model is right on at
most one clip of each pair), the export is deterministic and cached, and ``open_task`` makes it on demand."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_BACKBONES

from vpeft.data.moving_digits import (
    DIRECTIONS,
    MOVING_DIGITS_SPLIT_SIZES,
    direction_step,
    ensure_moving_digits_task,
    make_clip,
    opposite,
)
from vpeft.data.video import read_clip_list
from vpeft.errors import DataError
from vpeft.run import open_task
from vpeft.tasks import VideoTask


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    folder = open_task(root, "moving_digits")  # exported on demand, like digits
    assert folder.path == root / "moving_digits"
    return root


def _frames(clip: Path) -> np.ndarray:
    files = sorted(clip.iterdir())
    return np.stack([np.asarray(Image.open(f), dtype=np.float64) for f in files])


def _centroid(frame: np.ndarray) -> np.ndarray:
    ys, xs = np.indices(frame.shape)
    return np.array([(xs * frame).sum(), (ys * frame).sum()]) / frame.sum()


def _direction_from_centroids(frames: np.ndarray) -> int:
    dx, dy = np.sign(np.round(_centroid(frames[-1]) - _centroid(frames[0]), 6)).astype(int)
    return [direction_step(k) for k in range(8)].index((int(dx), int(dy)))


def test_the_label_is_the_direction_of_motion_of_the_frames_centroids(root):
    folder = root / "moving_digits"
    assert (folder / "classes.txt").read_text().split() == list(DIRECTIONS)
    for split, size in MOVING_DIGITS_SPLIT_SIZES.items():
        samples = read_clip_list(folder, split)
        assert len(samples) == size
        labels = np.array([y for _, y in samples])
        assert np.bincount(labels, minlength=8).tolist() == [size // 8] * 8, f"{split} is not balanced"
        for clip, label in samples:
            frames = _frames(clip)
            assert frames.shape == (8, 32, 32)
            assert _direction_from_centroids(frames) == label, clip
            steps = np.diff([_centroid(f) for f in frames], axis=0)  # a straight line at constant speed
            np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=1e-9)


def test_every_clip_has_its_reversal_with_the_opposite_label(root):
    folder = root / "moving_digits"
    for split in MOVING_DIGITS_SPLIT_SIZES:
        samples = read_clip_list(folder, split)
        for (a, ya), (b, yb) in zip(samples[::2], samples[1::2]):
            assert yb == opposite(ya) != ya
            assert np.array_equal(_frames(b), _frames(a)[::-1]), (a, b)
    assert len(read_clip_list(folder, "trainval")) == 1000


def test_a_mean_pooled_frame_wise_model_is_right_on_at_most_one_clip_of_each_pair(root):
    """An order-free model sees a clip and its reversal as the same set of frames: one prediction for both, and
    the two labels differ, so its top-1 is at most 50% (with 8 classes) on every split, whatever its weights."""
    from vpeft.data import build_dataloader

    factory, size = TINY_BACKBONES["vit_cls"]
    backbone = factory()
    backbone.reset_classifier(0)
    torch.manual_seed(0)
    task = VideoTask.from_folder(root / "moving_digits")
    model = task.build(backbone).eval()
    ds = task.dataset(root / "moving_digits", "val", model)
    assert not ds.random_augmentation  # 8 of 8 frames: every frame read, the reversal's are the same frames
    preds, labels = [], []
    with torch.no_grad():
        for x, y in build_dataloader(ds, batch_size=50, shuffle=False):
            preds.append(model(x).argmax(1))
            labels.append(y)
    preds, labels = torch.cat(preds), torch.cat(labels)
    assert torch.equal(preds[0::2], preds[1::2]), "a mean-pooled model told a clip from its reversal"
    right = (preds == labels).view(-1, 2).sum(1)
    assert right.max() <= 1 and (preds == labels).float().mean() <= 0.5


def test_export_is_deterministic_and_cached(root, tmp_path):
    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
        return h.hexdigest()

    again = ensure_moving_digits_task(tmp_path)
    assert digest(again) == digest(root / "moving_digits")
    assert ensure_moving_digits_task(tmp_path) == again  # already there: nothing rewritten
    assert not list(tmp_path.glob(".moving_digits.tmp-*"))
    (again / "val.txt").write_text("clips/val/0000 0\n")
    with pytest.raises(DataError, match="not a complete moving-digits export .*delete it to re-export"):
        ensure_moving_digits_task(tmp_path)


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="frames=1 must be an int >= 2"):
        ensure_moving_digits_task(tmp_path, frames=1)
    with pytest.raises(DataError, match="16 frames at 2 px per frame do not fit .* use canvas >= 38"):
        ensure_moving_digits_task(tmp_path, frames=16)
    with pytest.raises(DataError, match="frame 2 at .10, 0. leaves the 16x16 canvas"):
        make_clip(np.ones((8, 8), np.uint8), DIRECTIONS.index("right"), (6, 0), 2, 4, 16)
    assert not (tmp_path / "moving_digits").exists()
