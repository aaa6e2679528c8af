"""Image classification: the backbone's own classifier, cross-entropy, top-1 accuracy (today's default task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .base import Meter, Task, register_task

__all__ = ["ClassificationMeter", "ClassificationTask", "logits_of", "split_names", "topk_correct"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself (timm) or ``output.logits`` (Hugging Face)."""
    from ..arch.hf import logits_of as _hf_logits  # the arch layer knows Hugging Face's output types

    return _hf_logits(output)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Number of rows whose target is among the ``k`` highest logits (a 0-d tensor on the logits' device)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == targets.unsqueeze(-1)).any(dim=-1).sum()


class ClassificationMeter(Meter):
    """Running mean loss and top-1 accuracy over batches.

    Sums stay on the device as tensors, so updating never synchronises with an accelerator; call
    :meth:`compute` (which does) when the numbers are needed.
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.correct: torch.Tensor | int = 0
        self.n = 0

    def update(self, loss: torch.Tensor, output: Any, target: torch.Tensor) -> None:
        """Add one batch: ``loss`` is the batch-mean loss, ``output`` logits ``(B, C)`` (or a model output)."""
        logits = logits_of(output)
        batch = target.shape[0]
        self.loss_sum = self.loss_sum + loss.detach().float() * batch
        self.correct = self.correct + topk_correct(logits.detach(), target, 1)
        self.n += batch

    def sums(self) -> torch.Tensor:
        return torch.tensor([float(self.loss_sum), float(self.correct), float(self.n)], dtype=torch.float64)

    def load_sums(self, sums: torch.Tensor) -> None:
        self.loss_sum, self.correct, self.n = float(sums[0]), round(float(sums[1])), round(float(sums[2]))

    def compute(self) -> dict[str, float | int]:
        """Return ``{"loss": mean loss, "top1": fraction correct in [0, 1], "n": samples}`` (NaN when empty)."""
        if self.n == 0:
            return {"loss": float("nan"), "top1": float("nan"), "n": 0}
        return {"loss": float(self.loss_sum) / self.n, "top1": float(self.correct) / self.n, "n": self.n}


_VTAB_LISTS = ("train800", "train800val200", "test", "val200")


def split_names(path: Path) -> list[str]:
    """The splits of a task folder: VTAB-1k split lists present, else the split image folders (never other files)."""
    from ..data import SPLITS

    lists = [s for s in SPLITS if (path / f"{s}.txt").is_file()]
    if lists:
        return lists
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "images")


@register_task
class ClassificationTask(Task):
    """One label per image; the head is the backbone's classifier (created with ``num_classes``).

    Task folders: VTAB-1k lists (``train800.txt`` ... with ``<image> <label>`` lines, see
    :class:`vpeft.data.VTABTask`) or one image folder per split with a sub-folder per class (``train/cat/...``).
    ``num_classes`` is ``None`` for a task used without a folder (the model's head decides).
    """

    kind: ClassVar[str] = "classification"
    primary_metric: ClassVar[str] = "top1"
    detect_priority: ClassVar[int] = -100  # the generic fallback: any folder of lists or split folders

    def __init__(self, num_classes: int | None = None) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes

    @classmethod
    def matches_folder(cls, path: Path) -> bool:
        return path.is_dir() and (
            any((path / f"{s}.txt").is_file() for s in _VTAB_LISTS) or any(p.is_dir() for p in path.iterdir())
        )

    @classmethod
    def from_folder(cls, path: Path, **options: Any) -> ClassificationTask:
        from ..data import ImageFolderDataset, VTABTask

        if options:
            raise ConfigError(f"classification tasks take no task options, got {sorted(options)}")
        if any((path / f"{s}.txt").is_file() for s in _VTAB_LISTS):
            return cls(VTABTask.from_dir(path).num_classes)
        splits = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
        if not splits:
            raise DataError(f"task folder {path} holds neither VTAB-1k split lists nor split image folders")
        return cls(max(ImageFolderDataset(p, verify=False).num_classes for p in splits))  # counting reads no image

    def dataset(
        self, path: Path, split: str, model: nn.Module, *, input_size: int | None = None, train: bool = False
    ) -> Dataset:
        from ..data import ImageFolderDataset, VTABTask, build_transform

        transform = build_transform(model, input_size=input_size)
        if (path / f"{split}.txt").is_file():
            return VTABTask.from_dir(path).dataset(split, transform)
        if (path / split).is_dir():  # test images are read once, at the end (checked as they are read)
            return ImageFolderDataset(path / split, transform, verify=split != "test")
        raise DataError(
            f"task {path.name!r} has no split {split!r} (no {split}.txt, no {split}/ folder); "
            f"splits there: {', '.join(split_names(path)) or 'none'}"
        )

    def describe(self) -> str:
        return f"classification, {self.num_classes} classes" if self.num_classes else "classification"

    def backbone_classes(self) -> int:
        if self.num_classes is None:
            raise ConfigError("ClassificationTask(num_classes=None) cannot size a classifier; give num_classes")
        return self.num_classes

    def loss(self, output: Any, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits_of(output).float(), target, label_smoothing=label_smoothing)

    def new_meter(self) -> ClassificationMeter:
        return ClassificationMeter()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes}
