"""Video task folders: clip lists, frame sampling (TSN segments or strided windows), PyAV decoding, validation.

Folder format (mmaction2's ``VideoDataset`` / ``RawframeDataset`` annotation lists)::

    <task>/
        classes.txt          one class name per line; line i names class index i
        train.txt            one "<clip> <label>" line per sample (paths relative to the folder, no spaces)
        val.txt, test.txt    the other splits ("a+b" joins lists, "trainval" is train + val)
        clips/...            video files any container PyAV reads (mp4, avi, mkv, webm, ...)

A ``<clip>`` may also be a folder of frames (mmaction2's raw frames): the images in it, sorted by file name, are
the clip's frames.

Sampling ``T`` frames from a clip of ``n`` (:func:`sample_indices`):

- ``stride=None`` (default, TSN: Wang et al., ECCV 2016): the clip is cut into ``T`` equal segments and one frame
  is taken per segment, at a random offset inside it for training and at its centre for evaluation;
- ``stride=s``: a window of ``T`` frames ``s`` apart (``(T - 1) * s + 1`` frames long), starting at a random frame
  for training and centred for evaluation (mmaction2's ``SampleFrames(clip_len=T, frame_interval=s)``).

``views=V`` (evaluation only) takes ``V`` temporal clips per sample -- TSN segments at ``V`` evenly spaced offsets,
or ``V`` evenly spaced windows -- stacked into one ``(V * T, 3, H, W)`` item; the video model averages their
logits (multi-view testing). Frames are resized and normalised by the backbone's image transform
(:func:`vpeft.data.build_transform`), so items are ``(frames (T, 3, H, W) float32, label)`` and batches
``(B, T, 3, H, W)``.

A dataset checks every sample up front (:class:`VideoDataset`): the file or frame folder exists, the container
opens and has a video stream, its frames (counted by demuxing, no decoding) are at least the sampled span, and the
label is a class index of ``classes.txt``; anything else raises a one-line :class:`~vpeft.errors.DataError` naming
the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vpeft.data.lists import list_files
from vpeft.errors import ConfigError, DataError
from vpeft.files import atomic_write

__all__ = [
    "FRAME_SUFFIXES",
    "VIDEO_SPLITS",
    "VIDEO_SUFFIXES",
    "VideoDataset",
    "count_frames",
    "draw_clip_sheet",
    "is_video_folder",
    "read_clip_list",
    "read_frames",
    "read_video_classes",
    "sample_indices",
    "write_clip",
]

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".flv")
FRAME_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")


# ------------------------------------------------------------------------------------------------ folder format
def is_video_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a video task folder: ``classes.txt`` and a ``train.txt`` or ``val.txt`` whose first line
    is ``<clip> <label>`` with a video file or a frame folder as the clip. The test list is never opened here (the
    protocol reads it once, at the end)."""
    path = Path(path)
    if not (path / "classes.txt").is_file():
        return False
    for split in ("train", "val"):
        lst = path / f"{split}.txt"
        if not lst.is_file():
            continue
        try:
            line = next((s for s in lst.read_text(encoding="utf-8").splitlines() if s.strip()), "")
        except (OSError, UnicodeDecodeError):
            return False
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            return False
        return fields[0].lower().endswith(VIDEO_SUFFIXES) or (path / fields[0]).is_dir()
    return False


def read_video_classes(task_dir: str | os.PathLike[str]) -> tuple[str, ...]:
    """The class names of ``classes.txt`` (line i names class i)."""
    path = Path(task_dir) / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path} does not exist; a video folder lists its class names there, one per line")
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise DataError(f"{path} is empty; list one class name per line")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{path} names class {dup!r} twice; class names must be unique")
    return names


def read_clip_list(task_dir: str | os.PathLike[str], split: str) -> list[tuple[Path, int]]:
    """The ``(clip path, label)`` samples of ``split`` in file order (``trainval`` and ``a+b`` join lists).

    Raises:
        DataError: a missing list (naming the splits present), a malformed line, a missing clip.
    """
    task_dir = Path(task_dir)
    samples: list[tuple[Path, int]] = []
    for list_file in list_files(task_dir, split, VIDEO_SPLITS):
        for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise DataError(f"malformed line {list_file}:{lineno}: {line!r}; expected '<clip path> <label index>'")
            clip = task_dir / fields[0]
            if not clip.exists():
                raise DataError(f"clip {clip} listed at {list_file}:{lineno} does not exist")
            samples.append((clip, int(fields[1])))
    if not samples:
        raise DataError(f"split {split!r} of {task_dir} lists no clips")
    return samples


# ------------------------------------------------------------------------------------------------ decoding
def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


def count_frames(clip: str | os.PathLike[str]) -> int:
    """The number of frames of a video file (demuxed packets of its first video stream, nothing decoded) or of a
    frame folder (its images).

    Raises:
        DataError: the file cannot be opened by PyAV or has no video stream.
    """
    clip = Path(clip)
    if clip.is_dir():
        return len(_frame_files(clip))
    import av

    try:
        with av.open(str(clip)) as container:
            if not container.streams.video:
                raise DataError(f"clip {clip} has no video stream")
            return sum(1 for packet in container.demux(video=0) if packet.size)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"clip {clip} cannot be read as a video: {exc}") from None


def read_frames(clip: str | os.PathLike[str], indices: Sequence[int]) -> list[Image.Image]:
    """The frames at ``indices`` (any order, repeats allowed) of a video file or frame folder, as RGB images.

    Raises:
        DataError: the clip cannot be decoded, or has fewer frames than the largest index asks for.
    """
    clip = Path(clip)
    wanted = sorted(set(int(i) for i in indices))
    if clip.is_dir():
        files = _frame_files(clip)
        if wanted and wanted[-1] >= len(files):
            raise DataError(f"frame folder {clip} has {len(files)} frames; frame {wanted[-1]} was asked for")
        got = {}
        for i in wanted:
            try:
                with Image.open(files[i]) as im:
                    got[i] = im.convert("RGB")
            except OSError as exc:
                raise DataError(f"frame {files[i]} cannot be read as an image: {exc}") from None
        return [got[int(i)] for i in indices]
    import av

    got = {}
    last = wanted[-1] if wanted else -1
    try:
        with av.open(str(clip)) as container:
            keep = set(wanted)
            for n, frame in enumerate(container.decode(video=0)):
                if n in keep:
                    got[n] = frame.to_image()
                if n >= last:
                    break
    except (av.error.FFmpegError, OSError) as exc:
        raise DataError(f"clip {clip} cannot be decoded: {exc}") from None
    if len(got) < len(wanted):
        raise DataError(f"clip {clip} decoded to {len(got)} of the frames asked for (up to frame {last})")
    return [got[int(i)] for i in indices]


def write_clip(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 15) -> Path:
    """Write ``frames`` ``(T, H, W, 3)`` uint8 as a video (codec from the suffix: H.264 for .mp4/.mkv, MPEG-4 Part 2
    for .avi); ``H`` and ``W`` must be even for H.264's 4:2:0 sampling."""
    import av

    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ConfigError(f"write_clip expects (T, H, W, 3) uint8 frames, got shape {frames.shape}")
    codec = "mpeg4" if path.suffix.lower() == ".avi" else "libx264"
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ------------------------------------------------------------------------------------------------ sampling
def _check_positive(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def needed_frames(num_frames: int, stride: int | None) -> int:
    """The frames a clip must have: ``T`` for TSN segments, ``(T - 1) * stride + 1`` for a strided window."""
    return num_frames if stride is None else (num_frames - 1) * stride + 1


def sample_indices(
    n: int,
    num_frames: int,
    *,
    stride: int | None = None,
    train: bool = False,
    views: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frame indices of ``views`` temporal clips of ``num_frames`` frames from a clip of ``n`` frames, in time order
    within each view (``(views * num_frames,)`` int64; see the module docstring for the two schemes).

    Raises:
        DataError: ``n`` is smaller than :func:`needed_frames`.
    """
    _check_positive("num_frames", num_frames)
    _check_positive("stride", stride, allow_none=True)
    _check_positive("views", views)
    need = needed_frames(num_frames, stride)
    if n < need:
        raise DataError(f"a clip of {n} frames is shorter than the {need} frames sampled")
    if train and views != 1:
        raise ConfigError("multi-view sampling is for evaluation; training takes one view")
    rng = rng if rng is not None else np.random.default_rng()
    out = []
    if stride is None:  # TSN: one frame per segment
        edges = np.arange(num_frames + 1) * (n / num_frames)
        lengths = np.diff(edges)
        for v in range(views):
            frac = rng.random(num_frames) if train else np.full(num_frames, (v + 0.5) / views)
            idx = np.floor(edges[:-1] + frac * lengths).astype(np.int64)
            out.append(np.clip(idx, 0, n - 1))
    else:  # a window of frames `stride` apart
        span = need
        room = n - span
        for v in range(views):
            if train:
                start = int(rng.integers(0, room + 1))
            else:
                start = room // 2 if views == 1 else round(v * room / (views - 1))
            out.append(start + np.arange(num_frames, dtype=np.int64) * stride)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ dataset
class VideoDataset(Dataset):
    """``(frames (V * T, 3, H, W), label)`` samples of a split, every clip checked when the dataset is built.

    Args:
        samples: ``(clip, label)`` pairs (:func:`read_clip_list`).
        num_classes: labels must be in ``0 .. num_classes - 1``.
        transform: the per-frame image transform (a PIL image to a ``(3, H, W)`` tensor).
        num_frames, stride, views: the sampling (:func:`sample_indices`).
        train: random offsets / starts (else centred, deterministic).
        classes_file: named in label errors.

    Training offsets are drawn from torch's RNG (seeded by the run, and per worker by the data loader).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        num_classes: int,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        num_frames: int = 8,
        stride: int | None = None,
        views: int = 1,
        train: bool = False,
        classes_file: Path | None = None,
    ) -> None:
        _check_positive("num_frames", num_frames)
        _check_positive("stride", stride, allow_none=True)
        _check_positive("views", views)
        if train and views != 1:
            raise ConfigError("multi-view sampling is for evaluation; training takes one view")
        self.samples = [(Path(c), int(y)) for c, y in samples]
        self.num_classes, self.transform, self.classes_file = int(num_classes), transform, classes_file
        self.num_frames, self.stride, self.views, self.train = num_frames, stride, views, bool(train)
        need = needed_frames(num_frames, stride)
        where = f" ({classes_file} lists {num_classes} classes)" if classes_file is not None else ""
        self.lengths: list[int] = []
        for clip, label in self.samples:
            if not 0 <= label < num_classes:
                raise DataError(f"clip {clip} has label {label}, not a class index 0..{num_classes - 1}{where}")
            n = count_frames(clip)
            if n == 0:
                raise DataError(f"clip {clip} holds no frames")
            if n < need:
                what = f"{num_frames} frames" if stride is None else f"{num_frames} frames {stride} apart"
                raise DataError(f"clip {clip} has {n} frames, fewer than the {need} needed for {what}")
            self.lengths.append(n)
        #: whether items change from one read to the next (the feature cache is then inexact)
        self.random_augmentation = self.train and any(n > need for n in self.lengths)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]

    def indices(self, i: int) -> np.ndarray:
        """The frame indices item ``i`` reads now (random for training)."""
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()))) if self.train else None
        return sample_indices(
            self.lengths[i], self.num_frames, stride=self.stride, train=self.train, views=self.views, rng=rng
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        clip, label = self.samples[i]
        frames = read_frames(clip, self.indices(i).tolist())
        return torch.stack([self.transform(f) for f in frames]), label


def draw_clip_sheet(
    frames: Sequence[Image.Image],
    path: str | os.PathLike[str],
    predicted: str,
    score: float,
    truth: str | None,
    *,
    height: int = 112,
) -> Path:
    """Write a contact sheet of a clip as a PNG, atomically: ``frames`` side by side in time order, each scaled to
    ``height`` px keeping its aspect ratio, under a caption with the predicted class and its score and the true
    class (green when they agree, red when not; white without a truth)."""
    from PIL import ImageDraw, ImageFont

    if not frames:
        raise ConfigError("draw_clip_sheet needs at least one frame")
    tiles = [f.convert("RGB").resize((max(1, round(f.width * height / f.height)), height)) for f in frames]
    font = ImageFont.load_default()
    caption = f"predicted: {predicted} {score:.2f}" + (f"   true: {truth}" if truth is not None else "")
    strip = 16
    sheet = Image.new("RGB", (sum(t.width for t in tiles) + 2 * (len(tiles) - 1), height + strip), (0, 0, 0))
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, strip))
        x += tile.width + 2
    colour = (255, 255, 255) if truth is None else (80, 220, 80) if truth == predicted else (240, 70, 70)
    ImageDraw.Draw(sheet).text((3, 2), caption, fill=colour, font=font)
    return atomic_write(Path(path), lambda tmp: sheet.save(tmp, format="PNG"))
