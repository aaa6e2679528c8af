"""The task slot: what a task adds around a frozen backbone (head or decoder, loss, metrics, batch format).

A :class:`Task` is a small object the training loop, :func:`vpeft.train.evaluate`, :func:`vpeft.run.finetune`,
the benchmark runner and :func:`vpeft.save` / :func:`vpeft.load` go through, so none of them knows which kind of
task it trains. A task:

- builds the model that is trained from a backbone (:meth:`Task.build`): the backbone itself when the task's head
  lives inside it (classification: timm's classifier), or a :class:`TaskModel` holding the backbone and a
  ``decoder`` module outside it (segmentation decoders, vision-language prompt learners);
- computes the loss of a batch (:meth:`Task.loss`) from the model's output and the batch's targets;
- accumulates its metrics over a whole split in a :class:`Meter` (sums only, so that distributed evaluation
  all-reduces them exactly);
- describes itself as JSON (:meth:`Task.to_dict`), which the delta header records, so a delta is only loaded for
  the kind of task it was trained on.

Batches are ``(inputs, targets)`` pairs for every task; what a target is (class index, mask) is the task's
business. A new task type is one module defining a :class:`Task` subclass registered with :func:`register_task`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..registry import Registry

__all__ = ["Meter", "Task", "TaskModel", "register_task", "task_for_folder", "task_from_dict", "task_kinds"]


class Meter(abc.ABC):
    """Metrics of one task accumulated over batches as sums (never a mean of per-batch means)."""

    @abc.abstractmethod
    def update(self, loss: torch.Tensor, output: Any, target: torch.Tensor) -> None:
        """Add one batch: ``loss`` is the batch-mean loss, ``output`` the model's output, ``target`` the targets."""

    @abc.abstractmethod
    def sums(self) -> torch.Tensor:
        """All accumulated sums as one 1-D float64 CPU tensor (what distributed evaluation all-reduces)."""

    @abc.abstractmethod
    def load_sums(self, sums: torch.Tensor) -> None:
        """Replace the accumulated sums by ``sums`` (the all-reduced result of :meth:`sums`)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, Any]:
        """The metrics: at least ``"loss"`` (mean) and ``"n"`` (samples), plus the task's own (floats or lists)."""

    def payload(self) -> Any | None:
        """Per-sample records that are not sums and that distributed evaluation must gather from every rank
        (detection: every image's boxes, for COCO mAP over the whole split), picklable; ``None`` (the default):
        :meth:`sums` is all there is."""
        return None

    def load_payloads(self, payloads: list[Any]) -> None:
        """Install the :meth:`payload` of every rank, in rank order (called after :meth:`load_sums`)."""
        raise NotImplementedError(f"{type(self).__name__} has a payload but cannot load gathered payloads")


class Task(abc.ABC):
    """What a task adds around a backbone.

    Attributes:
        kind: the registry name of the task type (``"classification"``, ``"segmentation"`` ...).
        primary_metric: the key of :meth:`Meter.compute` that selects models and ranks leaderboards.
    """

    kind: ClassVar[str]
    primary_metric: ClassVar[str]
    #: folder detection order of :func:`task_for_folder` (higher first); the generic fallback has the lowest
    detect_priority: ClassVar[int] = 0
    #: other task kinds whose folders this task type reads too (zero-shot reads classification folders)
    folder_kinds: ClassVar[tuple[str, ...]] = ()
    #: evaluation protocols besides "standard" the task type takes (:mod:`vpeft.tasks.protocols`)
    protocols: ClassVar[tuple[str, ...]] = ()
    #: the trained model can be evaluated on other task folders of this kind (cross-dataset transfer)
    transfers: ClassVar[bool] = False
    #: settings that only change how data is prepared: a delta trained with other values still fits the model
    DATA_OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: what one sample is, in throughput and latency units ("images", "clips")
    sample_unit: ClassVar[str] = "images"

    # ---- data: what a task folder holds and how its batches look ----------------------------------------------
    @classmethod
    def matches_folder(cls, path: Path) -> bool:
        """Whether the task folder at ``path`` is in this task type's format."""
        return False

    @classmethod
    @abc.abstractmethod
    def from_folder(cls, path: Path, **options: Any) -> Task:
        """The task of the folder at ``path`` (class count from its files) with the given task options."""

    @abc.abstractmethod
    def dataset(
        self, path: Path, split: str, model: nn.Module, *, input_size: int | None = None, train: bool = False
    ) -> Dataset:
        """The ``split`` of the folder at ``path`` as ``(input, target)`` samples prepared for ``model``."""

    def describe(self) -> str:
        """A short human description, e.g. ``"classification, 10 classes"``."""
        return self.kind

    def folder_options(self) -> dict[str, Any]:
        """The task options that select what of a folder the task reads (rebuilding it from a folder keeps them)."""
        return {}

    def named_metrics(self, metrics: Mapping[str, Any], dataset: Dataset) -> dict[str, Any]:
        """``metrics`` of ``dataset`` with its per-class values also keyed by class name, for people reading them
        (segmentation: ``iou_per_class``); the positional values stay as they are. Default: unchanged."""
        return dict(metrics)

    def save_predictions(
        self, model: nn.Module, dataset: Dataset, out_dir: Path, *, device: str = "cpu", limit: int | None = None
    ) -> list[Path]:
        """Write the model's predictions on ``dataset`` as files a person can look at (segmentation: colour
        overlays); task types without a picture form refuse."""
        raise ConfigError(
            f"{self.kind} tasks have no prediction images to save (segmentation, detection and video tasks do)"
        )

    # ---- model, loss and metrics --------------------------------------------------------------------------------
    def backbone_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for creating the backbone (e.g. ``dynamic_img_size`` for non-square inputs);
        backbones that do not take one are created without it."""
        return {}

    @abc.abstractmethod
    def backbone_classes(self) -> int:
        """The classifier size to create the backbone with (0: no classifier; the task brings its own head)."""

    def build(self, backbone: nn.Module) -> nn.Module:
        """The model that is trained and evaluated: ``backbone`` itself, or a :class:`TaskModel` around it."""
        return backbone

    def forward(self, model: nn.Module, inputs: Any, targets: Any) -> Any:
        """The model's output on one batch: what :meth:`loss` and the meter receive.

        The training loop and evaluation call this (``model`` may be a DistributedDataParallel wrapper, in training
        or evaluation mode); the default is ``model(inputs)``. A task whose model needs the targets inside its
        forward overrides it (detection: torchvision's detectors compute their losses there).
        """
        return model(inputs)

    def example_input(
        self, batch_size: int, img_size: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A random batch of ``batch_size`` inputs of the model :meth:`build` makes (latency measurements): images
        ``(B, 3, H, W)`` at the task's own ``size`` if it has one (an int or ``(H, W)``), else ``img_size``."""
        size = getattr(self, "size", None) or img_size
        h, w = (size, size) if isinstance(size, int) else size
        return torch.randn(batch_size, 3, h, w, generator=generator)

    def comparable_output(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """A float tensor of ``model``'s evaluation output on ``inputs`` that is continuous in the weights, for
        checking that merging a method leaves the model's function unchanged (bench latency records the largest
        difference). Default: the output itself; a task whose output is discrete (detection: boxes after score
        thresholds and NMS) returns what precedes the discrete step."""
        return model(inputs).float()

    @abc.abstractmethod
    def loss(self, output: Any, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """The batch-mean training loss (float32) of ``output`` against ``target``."""

    @abc.abstractmethod
    def new_meter(self) -> Meter:
        """An empty :class:`Meter` for this task's metrics."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description, ``{"kind": ..., **settings}``; :func:`task_from_dict` inverts it."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        """Build from :meth:`to_dict`'s output (without ``kind``); subclasses with settings override it."""
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def check_compatible(self, other: Mapping[str, Any], where: str) -> None:
        """Raise ConfigError unless a delta recorded for task ``other`` (its ``to_dict``) fits this task."""
        mine = self.to_dict()
        if other.get("kind") != mine["kind"]:
            raise ConfigError(
                f"{where} was trained for a {other.get('kind')!r} task; this model is a {mine['kind']!r} task"
            )

    def check_same_setup(self, other: Mapping[str, Any], where: str) -> None:
        """:meth:`check_compatible` for task types whose whole description must match but their
        :attr:`DATA_OPTIONS` (how data is prepared: a delta trained with other values still fits the model)."""
        Task.check_compatible(self, other, where)
        mine = self.to_dict()
        skip = ("kind", *self.DATA_OPTIONS)
        diff = [k for k in sorted(set(mine) | set(other)) if k not in skip and mine.get(k) != other.get(k)]
        if diff:
            detail = ", ".join(f"{k}={other.get(k)!r} (this model: {mine.get(k)!r})" for k in diff)
            raise ConfigError(f"{where} was trained for another {self.kind} set-up: {detail}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k != 'kind')})"


class TaskModel(nn.Module):
    """A backbone plus a task module outside it (a decoder), trained and saved as one model.

    :func:`vpeft.apply` adapts ``self.backbone`` with the method and trains every parameter of ``self.decoder``;
    :func:`vpeft.save` writes both (backbone tensors under ``backbone.``, decoder tensors under ``decoder.``),
    :func:`vpeft.merge` folds the method into the backbone and keeps the decoder. Subclasses define ``forward``.
    """

    def __init__(self, backbone: nn.Module, decoder: nn.Module, task: Task) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.__dict__["task"] = task  # a plain attribute: not a sub-module, not in state_dict

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The backbone's timm ``pretrained_cfg`` (mean/std/input size), so transforms read it as from a backbone."""
        return getattr(self.backbone, "pretrained_cfg", None) or {}


TASKS: Registry[type[Task]] = Registry("task kind")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` known to :func:`task_from_dict` under ``cls.kind``."""
    return TASKS.register(cls.kind, cls)


def task_kinds() -> list[str]:
    """The registered task kinds."""
    return TASKS.names()


def task_from_dict(data: Mapping[str, Any]) -> Task:
    """Rebuild a task from its :meth:`Task.to_dict` record (e.g. a delta header)."""
    return TASKS.get(str(data.get("kind"))).from_dict(data)


def task_for_folder(path: Path, kind: str | None = None, **options: Any) -> Task:
    """The task of a task folder: of type ``kind``, or of the first registered type whose format the folder has."""
    if kind is not None:
        return TASKS.get(kind).from_folder(Path(path), **options)
    for cls in sorted((c for _, c in TASKS.items()), key=lambda c: -c.detect_priority):
        if cls.matches_folder(Path(path)):
            return cls.from_folder(Path(path), **options)
    raise ConfigError(f"task folder {path} is in none of the known formats ({', '.join(task_kinds())})")
