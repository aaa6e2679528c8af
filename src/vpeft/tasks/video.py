"""Video classification on a frozen image backbone run frame-wise: TSN pooling or a temporal head, top-1.

The image-to-video transfer set-up of the survey's video methods (TSN, Wang et al. ECCV 2016; AIM, Yang et al.
ICLR 2023; ST-Adapter, Pan et al. NeurIPS 2022; ZeroI2V, Li et al. ECCV 2024): the backbone is an image model
that sees ``B * T`` frames as one batch (:meth:`VideoModel.forward` folds time into the batch, in that one place,
after telling the backbone's temporal modules ``T``: :func:`vpeft.layers.temporal.set_num_frames`); every image
method therefore works frame-wise unchanged, and temporal methods unfold time inside the blocks. The head
(:class:`VideoHead`, the model's ``decoder``, trained whole) reads one feature vector per frame (the backbone's
pre-logit features), adds an optional learned temporal position embedding and classifies:

- ``head="mean"``: the TSN baseline, the mean over time then a linear classifier (the same as averaging the
  per-frame class scores); order-free, so a clip and its reversal get the same logits;
- ``head="temporal"``: a residual temporal 1-D convolution (kernel 3 over time, pre-norm, GELU) before the mean
  and the classifier, so the order of the frames matters.

Batches are ``(clips (B, T, 3, H, W), labels (B,))``; with ``views=V`` (multi-view testing) evaluation items hold
``V * T`` frames and the model averages the ``V`` clips' logits. Metrics: loss and top-1 (the classification
meter). The folder format and the sampling options are in :mod:`vpeft.data.video`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..arch import get_family
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.temporal import set_num_frames
from .base import Task, TaskModel, register_task
from .classification import ClassificationMeter, logits_of
from .predict import base_dataset, first_items, predict_items, unique_png

__all__ = ["HEADS", "VideoHead", "VideoModel", "VideoTask"]

HEADS = ("mean", "temporal")


class VideoHead(nn.Module):
    """Per-frame features ``(N, T, C)`` -> logits ``(N, K)`` (see the module docstring for the heads)."""

    def __init__(self, width: int, num_classes: int, num_frames: int, head: str, temporal_pos: bool) -> None:
        super().__init__()
        self.kind = head
        self.pos = nn.Parameter(torch.zeros(num_frames, width)) if temporal_pos else None
        if head == "temporal":
            self.norm = nn.LayerNorm(width)
            self.conv = nn.Conv1d(width, width, kernel_size=3, padding=1)
        self.fc = nn.Linear(width, num_classes)
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            if feats.shape[1] != self.pos.shape[0]:
                raise ConfigError(
                    f"the temporal position embedding is for {self.pos.shape[0]} frames; "
                    f"the clips have {feats.shape[1]}"
                )
            feats = feats + self.pos
        if self.kind == "temporal":
            feats = feats + F.gelu(self.conv(self.norm(feats).transpose(1, 2)).transpose(1, 2))
        return self.fc(feats.mean(dim=1))


def _width(backbone: nn.Module) -> int:
    width = getattr(backbone, "num_features", None)
    if isinstance(width, int) and width > 0:
        return width
    config = getattr(backbone, "config", None)  # Hugging Face
    width = getattr(config, "hidden_size", None)
    if isinstance(width, int) and width > 0:
        return width
    raise ConfigError(f"cannot tell the feature width of {type(backbone).__name__} (no num_features / hidden_size)")


def _per_frame(backbone: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """One feature vector per image: the family's pre-logit features, else the output of a backbone built without
    a classifier (a Hugging Face ViT with ``num_labels=0``)."""
    try:
        family = get_family(backbone)
        return family.pre_logits(backbone, frames)
    except UnsupportedBackboneError:
        return logits_of(backbone(frames))


class VideoModel(TaskModel):
    """An image backbone run frame-wise plus a :class:`VideoHead`; ``forward(clips (B, V*T, 3, H, W))`` gives
    ``(B, K)`` logits (the mean over the ``V`` views)."""

    def __init__(self, backbone: nn.Module, task: VideoTask) -> None:
        param = next(backbone.parameters())
        head = VideoHead(_width(backbone), task.num_classes, task.num_frames, task.head, task.temporal_pos)
        super().__init__(backbone, head.to(device=param.device, dtype=param.dtype), task)
        set_num_frames(backbone, task.num_frames)  # marks the backbone as a video one before any method is applied

    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """``(B, V*T, 3, H, W)`` clips -> ``(B*V, T, C)`` per-frame features: the one place time is folded."""
        if clips.ndim != 5:
            raise ConfigError(f"a video model takes (B, T, 3, H, W) clips, got a {tuple(clips.shape)} tensor")
        b, n = clips.shape[:2]
        t = self.task.num_frames
        if n % t:
            raise ConfigError(f"clips of {n} frames are not whole views of the task's {t} frames")
        set_num_frames(self.backbone, t)
        frames = clips.reshape(b * n, *clips.shape[2:])
        feats = _per_frame(self.backbone, frames)
        return feats.reshape(b * (n // t), t, feats.shape[-1])

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        b = clips.shape[0]
        logits = self.decoder(self.frame_features(clips))
        return logits.reshape(b, -1, logits.shape[-1]).mean(dim=1)

    def cache_split(self) -> tuple[nn.Module, nn.Module]:
        """``(prefix, suffix)`` for the feature cache of a frozen backbone: per-frame features ``(B, V*T, C)``, then
        the head (and the view average)."""
        return _FrameFeatures(self), _HeadOnFeatures(self)


class _FrameFeatures(nn.Module):
    def __init__(self, model: VideoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        feats = self.model.frame_features(clips)
        return feats.reshape(clips.shape[0], -1, feats.shape[-1])


class _HeadOnFeatures(nn.Module):
    def __init__(self, model: VideoModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.num_frames = model.task.num_frames

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, n, c = feats.shape
        logits = self.decoder(feats.reshape(b * (n // self.num_frames), self.num_frames, c))
        return logits.reshape(b, -1, logits.shape[-1]).mean(dim=1)


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"video: {name}={value!r} must be a positive int{' or None' if allow_none else ''}")


def save_clip_sheets(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    max_frames: int = 8,
    limit: int | None = None,
) -> list[Path]:
    """Predict the clips of a video dataset and write one contact sheet per clip (``vpeft eval --save-masks DIR``).

    ``<clip stem>.png`` (``-2``, ``-3`` ... when a joined split repeats a name) shows the frames the model read for
    the clip (the first view's; at most ``max_frames``, evenly spaced among them), decoded again from the clip at
    their own resolution, under a caption with the predicted class, its softmax score and the true class
    (:func:`vpeft.data.video.draw_clip_sheet`, written atomically).

    Returns:
        The sheets written, in dataset order.
    """
    from ..data.video import VideoDataset, draw_clip_sheet, read_frames, read_video_classes

    base, indices = base_dataset(dataset)
    if not isinstance(base, VideoDataset):
        raise ConfigError(f"save_clip_sheets needs a VideoDataset, got {type(base).__name__}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ConfigError(f"save_clip_sheets: max_frames={max_frames!r} is invalid; expected an integer >= 1")
    indices = first_items(indices, limit, "save_clip_sheets")
    names = read_video_classes(base.classes_file.parent) if base.classes_file is not None else None
    out_dir, written, used = Path(out_dir), [], set()
    for i, logits in predict_items(model, base, indices, device, batch_size):
        probs = torch.softmax(logits.float(), dim=-1)
        k = int(probs.argmax())
        clip, label = base.samples[i]
        seen = base.indices(i)[: base.num_frames]  # the first view's frames, in time order
        pick = seen[torch.linspace(0, len(seen) - 1, min(max_frames, len(seen))).round().long().numpy()]
        name = names[k] if names is not None else str(k)
        truth = names[label] if names is not None else str(label)
        sheet = draw_clip_sheet(
            read_frames(clip, pick.tolist()),
            out_dir / unique_png(clip.stem if clip.suffix else clip.name, used),
            name,
            float(probs[k]),
            truth,
        )
        written.append(sheet)
    return written


@register_task
class VideoTask(Task):
    """Clip classification with a frame-wise image backbone.

    Args:
        num_classes: K (from ``classes.txt``).
        num_frames: T, frames sampled per clip (default 8).
        head: ``"mean"`` (TSN, order-free) or ``"temporal"`` (a temporal 1-D convolution; sees the order).
        temporal_pos: add a learned temporal position embedding to the per-frame features.
        stride: ``None``: TSN segment sampling; an int: a window of frames ``stride`` apart.
        views: temporal clips averaged at evaluation (multi-view testing; training takes one).
        size: the square frame size (default: the backbone's input size, or the caller's ``input_size``).

    Task folders: see :mod:`vpeft.data.video` (``train.txt`` of ``<clip> <label>`` lines + ``classes.txt``).
    """

    kind: ClassVar[str] = "video"
    primary_metric: ClassVar[str] = "top1"
    detect_priority: ClassVar[int] = 20  # before classification (whose VTAB lists also read "<path> <label>")
    sample_unit: ClassVar[str] = "clips"
    #: settings that only change how clips are read: a delta trained with other values still fits the model
    DATA_OPTIONS: ClassVar[tuple[str, ...]] = ("stride", "views", "size")
    OPTIONS: ClassVar[tuple[str, ...]] = ("num_frames", "head", "temporal_pos", "stride", "views", "size")

    def __init__(
        self,
        num_classes: int,
        num_frames: int = 8,
        head: str = "mean",
        temporal_pos: bool = False,
        stride: int | None = None,
        views: int = 1,
        size: int | None = None,
    ) -> None:
        _positive("num_classes", num_classes)
        _positive("num_frames", num_frames)
        _positive("stride", stride, allow_none=True)
        _positive("views", views)
        _positive("size", size, allow_none=True)
        if head not in HEADS:
            raise ConfigError(f"video: head={head!r} is not a video head; valid heads: {', '.join(HEADS)}")
        if not isinstance(temporal_pos, bool):
            raise ConfigError(f"video: temporal_pos={temporal_pos!r} must be true or false")
        self.num_classes, self.num_frames, self.head, self.temporal_pos = num_classes, num_frames, head, temporal_pos
        self.stride, self.views, self.size = stride, views, size

    # ---- data ---------------------------------------------------------------------------------------------------
    @classmethod
    def matches_folder(cls, path: Path) -> bool:
        from ..data.video import is_video_folder

        return is_video_folder(path)

    @classmethod
    def from_folder(cls, path: Path, **options: Any) -> VideoTask:
        """The task of a video folder: K from ``classes.txt``; ``options`` as the constructor's."""
        from ..data.video import read_video_classes

        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ConfigError(
                f"video: unknown task option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(cls.OPTIONS)}"
            )
        return cls(len(read_video_classes(path)), **options)

    def dataset(
        self, path: Path, split: str, model: nn.Module, *, input_size: int | None = None, train: bool = False
    ) -> Dataset:
        """``split`` as ``(frames (V*T, 3, H, W), label)`` items, every clip checked now (see
        :class:`vpeft.data.video.VideoDataset`); frames resized to :attr:`size` (else ``input_size``, else the
        backbone's) and normalised as the backbone's images."""
        from ..data import build_transform
        from ..data.video import VideoDataset, read_clip_list, read_video_classes

        path = Path(path)
        classes = read_video_classes(path)
        if len(classes) != self.num_classes:
            raise ConfigError(
                f"video: {path / 'classes.txt'} lists {len(classes)} classes; this task has {self.num_classes}"
            )
        transform = build_transform(model, input_size=self.size if self.size is not None else input_size)
        return VideoDataset(
            read_clip_list(path, split),
            self.num_classes,
            transform,
            num_frames=self.num_frames,
            stride=self.stride,
            views=1 if train else self.views,
            train=train,
            classes_file=path / "classes.txt",
        )

    def describe(self) -> str:
        return f"video, {self.num_classes} classes, {self.num_frames} frames, {self.head} head"

    def save_predictions(
        self, model: nn.Module, dataset: Dataset, out_dir: Path, *, device: str = "cpu", limit: int | None = None
    ) -> list[Path]:
        """A contact sheet per clip: the frames the model saw and the predicted class (:func:`save_clip_sheets`)."""
        return save_clip_sheets(model, dataset, out_dir, device=device, limit=limit)

    # ---- model, loss, metrics -----------------------------------------------------------------------------------
    def backbone_classes(self) -> int:
        """0: the backbone gives per-frame features; the video head classifies."""
        return 0

    def build(self, backbone: nn.Module) -> VideoModel:
        return VideoModel(backbone, self)

    def example_input(
        self, batch_size: int, img_size: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Random clips ``(B, T, 3, S, S)`` (one view), ``S`` the task's ``size`` or else ``img_size``."""
        side = self.size or img_size
        return torch.randn(batch_size, self.num_frames, 3, side, side, generator=generator)

    def loss(self, output: Any, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(output.float(), target, label_smoothing=label_smoothing)

    def new_meter(self) -> ClassificationMeter:
        return ClassificationMeter()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "num_frames": self.num_frames,
            "head": self.head,
            "temporal_pos": self.temporal_pos,
            "stride": self.stride,
            "views": self.views,
            "size": self.size,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VideoTask:
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def check_compatible(self, other: Mapping[str, Any], where: str) -> None:
        """A delta fits when it was trained for the same classes, frames, head and position embedding (the
        sampling -- ``stride``, ``views``, ``size`` -- may differ)."""
        self.check_same_setup(other, where)
