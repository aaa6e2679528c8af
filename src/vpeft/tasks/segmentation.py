"""Semantic segmentation on a frozen backbone: dense features, a light decoder, per-pixel loss, mIoU.

The dense-prediction application of visual PEFT (Polyhistor, Liu et al. NeurIPS 2022; LoRand, Yin et al. CVPR
2023; Mona, Yin et al. 2024): any vpeft method adapts the backbone, a small decoder outside it reads multi-level
feature maps (:mod:`vpeft.tasks.dense`) and predicts per-pixel class logits; both are trained and saved as one
:class:`~vpeft.tasks.TaskModel`. Decoders (:mod:`vpeft.tasks.decoders`): ``linear`` (DINOv2's BN + 1x1
linear evaluation) and ``fpn`` (ViTDet simple pyramid + FPN, panoptic-FPN fusion).

Batches are ``(images (B, 3, H, W), masks (B, h, w) int64)``; mask values are class indices, ``ignore_index``
(255: void) is ignored by the loss and the metrics. The model returns logits at the input resolution; when the
masks have another size the loss and the meter resample the logits bilinearly to the mask size.

Metrics (Everingham et al., PASCAL VOC; the mmsegmentation convention), from one confusion matrix accumulated
over the whole split (never a mean of per-batch values): ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; ``miou`` is the
mean over the classes whose union ``TP + FP + FN`` is > 0 (present in the ground truth or predicted anywhere in
the split; a class never seen nor predicted has no IoU and is left out, ``iou`` reports it as ``None``);
``pixel_acc`` = correct / labelled pixels; ``mean_acc`` = mean over classes present in the ground truth of
``TP_c / (TP_c + FN_c)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .base import Meter, Task, TaskModel, register_task
from .decoders import build_decoder, decoder_options, default_levels, get_decoder
from .dense import DenseFeatures
from .predict import base_dataset, first_items, predict_items

__all__ = [
    "SegmentationMeter",
    "SegmentationModel",
    "SegmentationTask",
    "resize_logits",
    "save_prediction_overlays",
    "segmentation_metrics",
]


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``logits`` ``(B, K, h, w)`` resampled bilinearly (``align_corners=False``) to ``size`` (no-op if equal)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ConfigError(f"segmentation expects (B, K, H, W) logits, got {type(output).__name__}")


def segmentation_metrics(confusion: torch.Tensor) -> dict[str, Any]:
    """mIoU, per-class IoU, pixel and mean class accuracy of a ``(K, K)`` confusion matrix (rows: ground truth).

    See the module docstring for the rules; values are fractions in [0, 1] (NaN when nothing was labelled).
    """
    cm = confusion.double().cpu()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    seen = union > 0
    iou = torch.where(seen, tp / union.clamp(min=1), torch.zeros_like(tp))
    total = float(cm.sum())
    present = gt > 0
    return {
        "miou": float(iou[seen].mean()) if seen.any() else float("nan"),
        "pixel_acc": float(tp.sum()) / total if total else float("nan"),
        "mean_acc": float((tp[present] / gt[present]).mean()) if present.any() else float("nan"),
        "iou": [float(v) if s else None for v, s in zip(iou.tolist(), seen.tolist())],
    }


class SegmentationMeter(Meter):
    """Mean loss and a confusion matrix over a whole split.

    The matrix stays on the device (``torch.bincount`` of ``target * K + prediction`` over the labelled pixels),
    so updating does not copy predictions to the host. Predictions are the argmax of the logits resampled to the
    mask size. ``sums()`` is ``[loss * images, images, confusion (K * K, row-major)]`` in float64 (exact for
    counts below 2**53).

    Args:
        num_classes: K.
        ignore_index: the void label (not counted).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.loss_sum: torch.Tensor | float = 0.0
        self.n = 0
        self.confusion: torch.Tensor | None = None

    def update(self, loss: torch.Tensor, output: Any, target: torch.Tensor) -> None:
        logits = resize_logits(_logits(output).detach(), target.shape[-2:])
        k = self.num_classes
        pred = logits.argmax(dim=1)
        valid = target != self.ignore_index
        counts = torch.bincount((target[valid] * k + pred[valid]).flatten(), minlength=k * k)
        if counts.numel() > k * k:
            raise DataError(
                f"a mask holds the value {int(target[valid].max())}, neither a class index 0..{k - 1} "
                f"nor {self.ignore_index} (void)"
            )
        counts = counts.reshape(k, k)
        self.confusion = counts if self.confusion is None else self.confusion + counts
        batch = target.shape[0]
        self.loss_sum = self.loss_sum + loss.detach().float() * batch
        self.n += batch

    def _matrix(self) -> torch.Tensor:
        if self.confusion is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self.confusion

    def sums(self) -> torch.Tensor:
        head = torch.tensor([float(self.loss_sum), float(self.n)], dtype=torch.float64)
        return torch.cat([head, self._matrix().detach().cpu().double().flatten()])

    def load_sums(self, sums: torch.Tensor) -> None:
        k = self.num_classes
        if sums.numel() != 2 + k * k:
            raise ValueError(f"segmentation meter sums have {sums.numel()} values, expected {2 + k * k}")
        self.loss_sum, self.n = float(sums[0]), round(float(sums[1]))
        self.confusion = sums[2:].round().to(torch.int64).reshape(k, k)

    def compute(self) -> dict[str, Any]:
        """``{"loss", "n", "miou", "pixel_acc", "mean_acc", "iou": per-class list (None: class absent)}``."""
        out: dict[str, Any] = {"loss": float(self.loss_sum) / self.n if self.n else float("nan"), "n": self.n}
        out.update(segmentation_metrics(self._matrix()))
        return out


class SegmentationModel(TaskModel):
    """A backbone plus a segmentation decoder; ``forward(x)`` gives ``(B, K, H, W)`` logits at the input size.

    The feature reader (:class:`~vpeft.tasks.dense.DenseFeatures`) is a plain attribute holding names and
    shapes, not a module, so the state dict holds ``backbone.*`` and ``decoder.*`` only.
    """

    def __init__(self, backbone: nn.Module, task: SegmentationTask) -> None:
        probe = DenseFeatures(backbone, levels=(-1,))
        levels = (
            task.levels if task.levels is not None else default_levels(probe.kind, len(probe.candidates), task.decoder)
        )
        features = probe.with_levels(levels)
        decoder = build_decoder(task.decoder, features.levels, task.num_classes, features.kind, **task.options)
        param = next(backbone.parameters())
        super().__init__(backbone, decoder.to(device=param.device, dtype=param.dtype), task)
        self.__dict__["features"] = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.features(self.backbone, x)
        return resize_logits(self.decoder(maps), x.shape[-2:])

    def cache_split(self) -> tuple[nn.Module, nn.Module] | None:
        """``(prefix, suffix)`` with ``suffix(prefix(x))`` equal to ``forward(x)`` up to the final resize (the loss
        and the meter resample logits to the mask size themselves): the prefix reads the backbone's feature maps
        stacked into one ``(B, L, C, h, w)`` tensor, the suffix runs the decoder. ``None`` for CNN / Swin stages (their
        levels differ in shape, which one cached tensor per sample cannot hold). Used by the feature cache
        (:mod:`vpeft.train.cache`) for the frozen-backbone baseline, after it checked the backbone is frozen."""
        if self.features.kind != "vit":  # a ViT's levels share width and patch grid; stages do not
            return None
        return _StackedFeatures(self), _DecoderOnStack(self.decoder)


class _StackedFeatures(nn.Module):
    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(self.model.features(self.model.backbone, x)), dim=1)


class _DecoderOnStack(nn.Module):
    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return self.decoder(list(stacked.unbind(dim=1)))


@register_task
class SegmentationTask(Task):
    """Semantic segmentation: per-pixel cross-entropy with a void label, mIoU over the split.

    Args:
        num_classes: K (void excluded).
        decoder: a registered decoder's name (:mod:`vpeft.tasks.decoders`: ``"linear"``, ``"fpn"``, ...).
        ignore_index: the void label of the masks (255).
        levels: feature levels the decoder reads (indices into :attr:`DenseFeatures.candidates`, i.e. ViT
            blocks or Swin / CNN stages; negative from the end); ``None``: the decoder's default
            (:func:`~vpeft.tasks.decoders.default_levels`).
        size: ``(H, W)`` the images are resized to (default: the backbone's input size, or the ``input_size``
            the caller passes to :meth:`dataset`); non-square sizes need a ViT built for them or with
            ``dynamic_img_size=True``.
        augment: random rescale + crop + flip of the training split (off by default, as VTAB's protocol).
        native_masks: evaluation splits keep their masks at the stored resolution (the logits are resampled to
            it), so mIoU is measured at the dataset's own resolution rather than at the input size.
        options: decoder options (``dropout``; ``width`` for ``fpn``).

    Task folders: see :mod:`vpeft.data.segmentation` (``train.txt`` of ``<image> <mask>`` lines + ``classes.txt``;
    splits ``train``, ``val``, ``trainval``, ``test``).
    """

    kind: ClassVar[str] = "segmentation"
    primary_metric: ClassVar[str] = "miou"
    detect_priority: ClassVar[int] = 10  # before classification's generic fallback (which takes any split folders)
    #: settings that only change how data is prepared: a delta trained with other values still fits the model
    DATA_OPTIONS: ClassVar[tuple[str, ...]] = ("size", "augment", "native_masks")

    def __init__(
        self,
        num_classes: int,
        decoder: str = "linear",
        ignore_index: int = 255,
        levels: Sequence[int] | None = None,
        size: Sequence[int] | None = None,
        augment: bool = False,
        native_masks: bool = False,
        **options: Any,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"segmentation: num_classes={num_classes!r} must be a positive int")
        get_decoder(decoder)  # an unknown name lists the registered decoders
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
            raise ConfigError(
                f"segmentation: ignore_index={ignore_index!r} must be an int outside the classes 0..{num_classes - 1}"
            )
        valid = decoder_options(decoder)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"segmentation: unknown option(s) {', '.join(map(repr, unknown))} for the {decoder!r} decoder; "
                f"valid task options: levels, size, augment, native_masks, ignore_index, {', '.join(valid)}"
            )
        self.num_classes, self.decoder, self.ignore_index = num_classes, decoder, ignore_index
        self.levels = None if levels is None else tuple((levels,) if isinstance(levels, int) else levels)
        if size is not None and (
            len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ConfigError(f"segmentation: size={size!r} must be an (height, width) pair of positive ints")
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.augment, self.native_masks = bool(augment), bool(native_masks)
        self.options = dict(options)

    # ---- data ---------------------------------------------------------------------------------------------------
    @classmethod
    def matches_folder(cls, path: Path) -> bool:
        from ..data.segmentation import is_segmentation_folder

        return is_segmentation_folder(path)

    @classmethod
    def from_folder(cls, path: Path, **options: Any) -> SegmentationTask:
        """The task of a segmentation folder: K from ``classes.txt``; ``options`` as the constructor's."""
        from ..data.segmentation import SegmentationFolder

        return cls(SegmentationFolder.from_dir(path).num_classes, **options)

    def dataset(
        self, path: Path, split: str, model: nn.Module, *, input_size: int | None = None, train: bool = False
    ) -> Dataset:
        """``split`` of the folder as ``(image, mask)`` pairs at :attr:`size` (else ``input_size``, else the
        backbone's), normalised with the backbone's mean/std; augmented when training with ``augment=True``; masks
        of evaluation splits at their stored size with ``native_masks=True``."""
        from ..data.segmentation import load_segmentation_split

        size = self.size if self.size is not None else input_size
        return load_segmentation_split(
            path, split, model, size=size, augment=self.augment and train, native_masks=self.native_masks and not train
        )

    def describe(self) -> str:
        return f"segmentation, {self.num_classes} classes, {self.decoder} decoder"

    def named_metrics(self, metrics: Mapping[str, Any], dataset: Dataset) -> dict[str, Any]:
        """``metrics`` plus ``iou_per_class``: ``{class name: IoU}`` in ``classes.txt`` order (``None``: a class
        neither present nor predicted), beside the positional ``iou`` list."""
        out = dict(metrics)
        names = getattr(base_dataset(dataset)[0], "class_names", None)
        if names is not None and isinstance(out.get("iou"), list) and len(names) == len(out["iou"]):
            out["iou_per_class"] = dict(zip(names, out["iou"]))
        return out

    def save_predictions(
        self, model: nn.Module, dataset: Dataset, out_dir: Path, *, device: str = "cpu", limit: int | None = None
    ) -> list[Path]:
        """Colour overlays of the predicted classes (:func:`save_prediction_overlays`)."""
        return save_prediction_overlays(model, dataset, out_dir, device=device, limit=limit)

    # ---- model, loss, metrics -----------------------------------------------------------------------------------
    def backbone_classes(self) -> int:
        """0: the backbone is built without a classifier; the decoder predicts the classes."""
        return 0

    def backbone_kwargs(self) -> dict[str, Any]:
        """A non-square :attr:`size` needs a ViT that takes any patch grid (timm ``dynamic_img_size``)."""
        return {"dynamic_img_size": True} if self.size is not None and self.size[0] != self.size[1] else {}

    def build(self, backbone: nn.Module) -> SegmentationModel:
        return SegmentationModel(backbone, self)

    def loss(self, output: Any, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """Mean cross-entropy over the labelled pixels of the batch (0 when all are void), logits at mask size."""
        logits = resize_logits(_logits(output).float(), target.shape[-2:])
        total = F.cross_entropy(
            logits, target, ignore_index=self.ignore_index, label_smoothing=label_smoothing, reduction="sum"
        )
        return total / (target != self.ignore_index).sum().clamp(min=1)

    def new_meter(self) -> SegmentationMeter:
        return SegmentationMeter(self.num_classes, self.ignore_index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "decoder": self.decoder,
            "ignore_index": self.ignore_index,
            "levels": None if self.levels is None else list(self.levels),
            "size": None if self.size is None else list(self.size),
            "augment": self.augment,
            "native_masks": self.native_masks,
            **self.options,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentationTask:
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    def check_compatible(self, other: Mapping[str, Any], where: str) -> None:
        """A delta fits when it was trained for the same classes, decoder, levels and decoder options (data
        options -- ``size``, ``augment`` -- may differ)."""
        self.check_same_setup(other, where)


def save_prediction_overlays(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    palette: Sequence[Sequence[int]] | None = None,
    alpha: float = 0.5,
    limit: int | None = None,
) -> list[Path]:
    """Predict the items of a segmentation dataset and write each prediction as a colour overlay PNG.

    For ``vpeft eval --save-masks DIR``: one ``<mask file stem>.png`` per item in ``out_dir``, the predicted
    classes (logits resampled to the stored mask's resolution) blended over the stored image at its own size
    (:func:`vpeft.data.segmentation.save_overlay`, written atomically); pixels the ground truth marks void are left
    uncoloured. Beside them ``legend.png`` (``_legend.png`` if a mask is named ``legend``): each class's colour and
    name (:func:`vpeft.data.segmentation.save_legend`).

    Args:
        model: a segmentation model (``(B, 3, H, W) -> (B, K, H, W)`` logits), already on ``device``.
        dataset: a :class:`~vpeft.data.segmentation.SegmentationDataset` or a ``Subset`` of one.
        palette: one ``(r, g, b)`` per class (default: :func:`vpeft.data.segmentation.default_palette`).
        limit: write at most this many overlays.

    Returns:
        The overlays written, in dataset order (the legend is not among them).
    """
    from ..data.segmentation import VOID, default_palette, save_legend, save_overlay

    base, indices = base_dataset(dataset)
    if not hasattr(base, "pairs") or not hasattr(base, "mean"):
        raise ConfigError(f"save_prediction_overlays needs a SegmentationDataset, got {type(base).__name__}")
    indices = first_items(indices, limit, "save_prediction_overlays")
    out_dir, written = Path(out_dir), []
    palette = list(palette) if palette is not None else default_palette(base.num_classes)
    names = {Path(base.pairs[i][1]).stem + ".png" for i in indices}
    legend = "legend.png"
    while legend in names:  # a mask named legend keeps its overlay's name
        legend = "_" + legend
    save_legend(base.class_names, out_dir / legend, palette)
    for i, lg in predict_items(model, base, indices, device, batch_size):
        image_path, mask_path = base.pairs[i]
        with Image.open(image_path) as im:  # the stored image, at its own resolution
            original = im.convert("RGB")
        with Image.open(mask_path) as mk:
            truth = torch.from_numpy(np.asarray(mk, dtype=np.int64))
        pred = resize_logits(lg[None].float(), truth.shape[-2:])[0].argmax(0).cpu()
        pred[truth == VOID] = VOID
        name = Path(mask_path).stem + ".png"
        written.append(save_overlay(original, pred, out_dir / name, palette, alpha=alpha))
    return written
