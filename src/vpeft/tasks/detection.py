"""Object detection on a frozen backbone: multi-scale features, a torchvision detector, COCO mAP.

Dense prediction beyond segmentation (ViTDet, Li et al. ECCV 2022; Mona, Yin et al. 2024 on COCO): any vpeft
method adapts the backbone; a detector outside it -- **torchvision's** FCOS (Tian et al., ICCV 2019), RetinaNet
(Lin et al., ICCV 2017) or Faster R-CNN (Ren et al., NeurIPS 2015) -- reads a feature pyramid built from the
backbone's maps. Everything of the detector is torchvision's (heads, anchor generators, box coders, matchers,
samplers, NMS, losses); vpeft writes only the glue:

* **the neck** (:class:`DetectionNeck`, the detector's ``backbone`` module with ``out_channels``, returning an
  ``OrderedDict`` of maps): for a ViT, ViTDet's simple feature pyramid (Sec. 3 of the paper) from the last block's
  map -- scales 2 / 1 / 1/2 of the patch grid (:class:`~vpeft.tasks.decoders.fpn.SimplePyramid`), i.e. strides
  8 / 16 / 32 px for patch 16, each followed by ViTDet's ``1x1 conv -> LN -> 3x3 conv -> LN`` to the common
  width; for Swin / CNN stages, the last three stages (strides 8 / 16 / 32 on the usual models) through
  torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`;
* **anchors from the strides**: FCOS one point per location of size = stride (torchvision's convention: its
  centre sampling and scale ranges read the anchor size as the stride); RetinaNet and the Faster R-CNN RPN three
  octave scales ``4 * stride * 2^(i/3)`` times aspect ratios 0.5 / 1 / 2 (RetinaNet's set-up);
* **no second resize**: the dataset already resized, normalised and padded the image to its ``S x S`` canvas
  (:mod:`vpeft.data.detection`), so the detector's transform keeps images as they are (mean 0, std 1, no resize),
  and boxes come out in input pixels;
* **targets**: the padded ``(B, M, 9)`` target tensor becomes torchvision's list of ``{"boxes", "labels"}`` --
  crowd boxes and padding rows removed (torchvision has no ignore regions; COCO evaluation uses the crowd boxes);
  Faster R-CNN's labels shifted by one (its class 0 is the background).

The detector needs the targets inside its forward (it computes its losses there and, for Faster R-CNN, samples
proposals against the boxes), so the task overrides :meth:`Task.forward`: in training ``model(images, targets)``
returns torchvision's loss dict and :meth:`DetectionTask.loss` sums it; in evaluation ``model(images)`` returns
torchvision's detections (``boxes`` xyxy in input pixels, ``scores``, ``labels`` 0..K-1). torchvision's detectors
compute no losses in evaluation mode; for FCOS and RetinaNet the evaluation forward (``model(images, targets)``,
still torchvision's eval forward) also calls torchvision's own ``compute_loss`` on that forward's head outputs and
anchors, so evaluation reports the same loss training would on that batch (without dropout / drop-path and with
BatchNorm's running statistics). Faster R-CNN keeps NaN (``None`` in JSON): its training losses sample 256 anchors
and 512 proposals per image at random, with the ground-truth boxes added to the proposals, from 2000 RPN proposals
per image (1000 in evaluation), so no evaluation forward holds the loss training computes.

Metrics (:class:`DetectionMeter`): pycocotools' ``COCOeval`` over the whole split, in the stored images' pixels
(boxes mapped back through the resize), with the annotations' own ``area`` and ``iscrowd``: ``map``
(AP@[.50:.95]), ``ap50``, ``ap75``, ``ap_small`` / ``ap_medium`` / ``ap_large`` (COCO's 32^2 / 96^2 px ranges,
100 detections per image) and per-class AP (``ap``, in class order, ``None`` for a class without a box in the
split; named by :attr:`DetectionTask.class_names`).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import Meter, Task, TaskModel, register_task
from .decoders.fpn import ChannelNorm, SimplePyramid
from .dense import DenseFeatures
from .predict import base_dataset, first_items, predict_items, unique_png

__all__ = [
    "DETECTORS",
    "EVAL_LOSS_DETECTORS",
    "DetectionMeter",
    "DetectionModel",
    "DetectionNeck",
    "DetectionTask",
    "Detections",
    "coco_metrics",
    "default_detection_width",
    "save_detection_images",
]

#: the detectors a task can use, with one line each (``--task-opt detector=NAME``)
DETECTORS: dict[str, str] = {
    "fcos": "torchvision FCOS (anchor-free, centre-ness; GroupNorm head: width a multiple of 32)",
    "retinanet": "torchvision RetinaNet (9 anchors per location, focal loss)",
    "faster_rcnn": "torchvision Faster R-CNN (RPN + RoIAlign + two-layer box head)",
}
#: ViTDet's simple-pyramid scales relative to the patch grid (strides patch/2, patch, 2*patch)
VIT_SCALES: tuple[float, ...] = (2.0, 1.0, 0.5)
NUM_LEVELS = 3
DETECTIONS_PER_IMAGE = 100  # COCO's maxDets
SCORE_THRESH = 0.05  # the low threshold COCO-style evaluation uses (the ranking decides AP)


def default_detection_width(in_channels: Sequence[int]) -> int:
    """Half the widest input map, rounded down to a multiple of 32, between 32 and 256 (ViT-S: 192, ViT-B: 256)."""
    return max(32, min(256, max(in_channels) // 2 // 32 * 32))


# --------------------------------------------------------------------------------------------------------- neck
class _ViTDetScale(nn.Module):
    """One level of ViTDet's simple pyramid: rescale, then ``1x1 conv -> LN -> 3x3 conv -> LN``."""

    def __init__(self, channels: int, scale: float, width: int) -> None:
        super().__init__()
        self.rescale = SimplePyramid(channels, scale)
        c = self.rescale.out_channels
        self.proj = nn.Sequential(
            nn.Conv2d(c, width, 1, bias=False),
            ChannelNorm(width),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            ChannelNorm(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.rescale(x))


class DetectionNeck(nn.Module):
    """The detector's ``backbone``: images -> ``OrderedDict("0", "1", "2")`` of ``(B, width, h, w)`` maps.

    It reads the vpeft backbone of the :class:`DetectionModel` that owns it at every call (a plain attribute, not
    a sub-module: the backbone's tensors are saved once, under ``backbone.``), so the wrappers a method puts into
    the backbone, and a merge, are seen.

    Attributes:
        out_channels: the common width (torchvision's detectors read it).
        strides: input pixels per map cell of each level.
    """

    def __init__(self, features: DenseFeatures, width: int | None) -> None:
        super().__init__()
        self.__dict__["features"] = features
        levels = features.levels
        if features.kind == "vit":
            channels = levels[-1].channels
            width = default_detection_width([channels]) if width is None else width
            self.scales = nn.ModuleList(_ViTDetScale(channels, s, width) for s in VIT_SCALES)
            patch = float(levels[-1].stride[0])
            self.strides = tuple(patch / s for s in VIT_SCALES)
            self.fpn = None
        else:
            from torchvision.ops import FeaturePyramidNetwork

            channels = [lv.channels for lv in levels]
            width = default_detection_width(channels) if width is None else width
            self.scales = None
            self.fpn = FeaturePyramidNetwork(channels, width)
            self.strides = tuple(float(lv.stride[0]) for lv in levels)
        self.out_channels = width

    def attach(self, owner: DetectionModel) -> None:
        self.__dict__["owner"] = owner

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.features(self.__dict__["owner"].backbone, images)
        if self.scales is not None:
            return OrderedDict((str(i), op(maps[-1])) for i, op in enumerate(self.scales))
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def _transform():
    """torchvision's detector transform with the resize removed and an identity normalisation: the dataset has
    already put each image on its normalised ``S x S`` canvas."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class CanvasTransform(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return CanvasTransform(min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3, size_divisible=1)


def _size(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def build_detector(name: str, neck: DetectionNeck, num_classes: int) -> nn.Module:
    """The torchvision detector ``name`` on ``neck``'s levels for ``num_classes`` object classes (no background)."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    n, width = len(neck.strides), neck.out_channels
    octaves = tuple(tuple(_size(4 * s * 2 ** (i / 3)) for i in range(3)) for s in neck.strides)
    ratios = ((0.5, 1.0, 2.0),) * n
    common = {"min_size": 1, "max_size": 1, "image_mean": [0.0] * 3, "image_std": [1.0] * 3}
    if name == "fcos":
        points = AnchorGenerator(tuple((_size(s),) for s in neck.strides), ((1.0,),) * n)
        model = FCOS(neck, num_classes, anchor_generator=points, score_thresh=SCORE_THRESH,
                     detections_per_img=DETECTIONS_PER_IMAGE, **common)  # fmt: skip
    elif name == "retinanet":
        model = RetinaNet(neck, num_classes, anchor_generator=AnchorGenerator(octaves, ratios),
                          score_thresh=SCORE_THRESH, detections_per_img=DETECTIONS_PER_IMAGE, **common)  # fmt: skip
    elif name == "faster_rcnn":
        representation = min(1024, 4 * width)
        model = FasterRCNN(
            neck,
            num_classes=None,
            rpn_anchor_generator=AnchorGenerator(octaves, ratios),
            rpn_head=RPNHead(width, 9),
            box_roi_pool=MultiScaleRoIAlign([str(i) for i in range(n)], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(width * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes + 1),
            box_score_thresh=SCORE_THRESH,
            box_detections_per_img=DETECTIONS_PER_IMAGE,
            **common,
        )
    else:
        raise ConfigError(f"unknown detector {name!r}; valid detectors: {', '.join(DETECTORS)}")
    model.transform = _transform()
    return model


#: the detectors whose evaluation forward also gives torchvision's losses on the batch's targets (see
#: :meth:`DetectionModel.forward`); Faster R-CNN's losses sample at random, so it has none in evaluation
EVAL_LOSS_DETECTORS: tuple[str, ...] = ("fcos", "retinanet")


class Detections(list):
    """torchvision's per-image detections (a plain list of dicts) and ``losses``: torchvision's loss dict computed
    on the same forward for the batch's targets (empty when none was computed)."""

    def __init__(self, detections: Sequence[dict[str, torch.Tensor]], losses: Mapping[str, torch.Tensor]) -> None:
        super().__init__(detections)
        self.losses = dict(losses)


class DetectionModel(TaskModel):
    """A backbone plus a torchvision detector (``decoder``: neck + heads).

    ``forward(images, targets)`` in training returns torchvision's loss dict; ``forward(images)`` in evaluation
    the detections (list of ``{"boxes" (n, 4) xyxy input pixels, "scores" (n,), "labels" (n,) 0..K-1}``).
    ``targets`` is the dataset's padded ``(B, M, 9)`` tensor (:mod:`vpeft.data.detection`).
    """

    def __init__(self, backbone: nn.Module, task: DetectionTask) -> None:
        probe = DenseFeatures(backbone, levels=(-1,))
        if probe.kind == "vit":
            features = probe
        else:
            n = len(probe.candidates)
            features = probe.with_levels(tuple(range(max(0, n - NUM_LEVELS), n)))
        neck = DetectionNeck(features, task.width)
        detector = build_detector(task.detector, neck, task.num_classes)
        param = next(backbone.parameters())
        super().__init__(backbone, detector.to(device=param.device, dtype=param.dtype), task)
        self.__dict__["features"] = features
        neck.attach(self)

    @property
    def neck(self) -> DetectionNeck:
        return self.decoder.backbone

    @property
    def min_canvas(self) -> int:
        """The smallest canvas side this detector takes: for FCOS twice the coarsest stride (every pyramid level
        then has at least 2x2 cells, whether the backbone rounds a map's size up or down); 1 otherwise."""
        return math.ceil(2 * max(self.neck.strides)) if self.task.detector == "fcos" else 1

    def check_canvas(self, side: int) -> None:
        """Refuse a canvas on which FCOS's coarsest pyramid level has fewer than 2x2 cells.

        torchvision's FCOS head normalises every level with ``GroupNorm(32, width)`` over the level's cells: on a
        1x1 level (at width 32) each group holds one value, so the level's output is the constant bias whatever
        the image, and torch refuses such a batch of one image ("Expected more than 1 value per channel when
        training", in evaluation too). RetinaNet's and Faster R-CNN's heads have no normalisation.
        """
        if side < self.min_canvas:
            stride = max(self.neck.strides)
            cells = f"{side / stride:g}"
            raise ConfigError(
                f"detection: a {side} px canvas makes fcos's coarsest pyramid level (stride {stride:g}) "
                f"{cells}x{cells}, and its GroupNorm head needs every level at least 2x2; use size >= "
                f"{self.min_canvas} (twice the coarsest stride), or detector=retinanet / faster_rcnn"
            )

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        """Training: torchvision's loss dict. Evaluation: :class:`Detections`, with the losses on ``targets`` when
        they are given and the detector is FCOS or RetinaNet (:data:`EVAL_LOSS_DETECTORS`)."""
        self.check_canvas(min(images.shape[-2:]))
        batch = list(images.unbind(0))
        if self.training:
            if targets is None:
                raise ConfigError(
                    "a detection model in training mode needs the targets: model(images, targets) returns the losses "
                    "(call model.eval() for detections)"
                )
            return self.decoder(batch, self.task.torchvision_targets(targets))
        if targets is not None and self.task.detector in EVAL_LOSS_DETECTORS:
            detections, losses = self._detect_with_losses(batch, self.task.torchvision_targets(targets))
        else:
            detections, losses = self.decoder(batch), {}
        if self.task.detector == "faster_rcnn":  # its class 0 is the background
            detections = [{**d, "labels": d["labels"] - 1} for d in detections]
        return Detections(detections, losses)

    def _detect_with_losses(self, batch: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]):
        """The evaluation forward, unchanged, and torchvision's training losses from its own head outputs and
        anchors (caught with forward hooks): ``FCOS.compute_loss`` / ``RetinaNet.compute_loss`` on the targets
        the training path gets (the canvas transform leaves images and boxes as they are)."""
        det, seen = self.decoder, {}

        def on_head(module, args, output):
            seen["levels"] = [f.shape[2] * f.shape[3] for f in args[0]]
            seen["head"] = output

        hooks = [
            det.head.register_forward_hook(on_head),
            det.anchor_generator.register_forward_hook(lambda module, args, output: seen.update(anchors=output)),
        ]
        try:
            detections = det(batch)
        finally:
            for hook in hooks:
                hook.remove()
        if self.task.detector == "fcos":
            losses = det.compute_loss(targets, seen["head"], seen["anchors"], seen["levels"])
        else:
            losses = det.compute_loss(targets, seen["head"], seen["anchors"])
        return detections, losses


# ------------------------------------------------------------------------------------------------------- metrics
_STATS = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def _nan_if_missing(v: float) -> float:
    return float("nan") if v < 0 else float(v)


def coco_metrics(
    ground_truth: Sequence[np.ndarray], detections: Sequence[np.ndarray], num_classes: int
) -> dict[str, Any]:
    """COCO box AP of a whole split with pycocotools' ``COCOeval``.

    Args:
        ground_truth: per image, ``(n, 7)`` rows ``[x, y, w, h, label, iscrowd, area]`` (stored pixels).
        detections: per image, ``(k, 6)`` rows ``[x, y, w, h, score, label]``.
        num_classes: K (labels ``0..K-1``).

    Returns:
        ``{"map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"}`` (NaN where COCO has no value: no box of
        that size in the split) and ``"ap"``: per-class AP@[.50:.95] (``None`` for a class without a box).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ConfigError("detection metrics need pycocotools: pip install 'vpeft[det]'") from None

    images = [{"id": i + 1} for i in range(len(ground_truth))]
    categories = [{"id": k, "name": str(k)} for k in range(num_classes)]
    gts, dts = [], []
    for i, (gt, dt) in enumerate(zip(ground_truth, detections)):
        for x, y, w, h, label, crowd, area in np.asarray(gt, np.float64).reshape(-1, 7):
            gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(label), "bbox": [x, y, w, h],
                        "area": float(area), "iscrowd": int(crowd)})  # fmt: skip
        for x, y, w, h, score, label in np.asarray(dt, np.float64).reshape(-1, 6):
            dts.append({"id": len(dts) + 1, "image_id": i + 1, "category_id": int(label), "bbox": [x, y, w, h],
                        "area": float(w * h), "iscrowd": 0, "score": float(score)})  # fmt: skip
    nan = float("nan")
    empty = {**{k: nan for k in _STATS}, "ap": [None] * num_classes}
    if not gts or not any(not g["iscrowd"] for g in gts):
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt_api, dt_api = COCO(), COCO()
        gt_api.dataset = {"images": images, "categories": categories, "annotations": gts}
        dt_api.dataset = {"images": images, "categories": categories, "annotations": dts}
        gt_api.createIndex()
        dt_api.createIndex()
        ev = COCOeval(gt_api, dt_api, "bbox")
        ev.params.catIds = list(range(num_classes))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {k: _nan_if_missing(v) for k, v in zip(_STATS, ev.stats[:6])}
    precision = ev.eval["precision"]  # [IoU thresholds, recall points, classes, area ranges, max detections]
    per_class = []
    for k in range(num_classes):
        p = precision[:, :, k, 0, -1]
        per_class.append(float(p[p > -1].mean()) if (p > -1).any() else None)
    out["ap"] = per_class
    return out


class DetectionMeter(Meter):
    """Mean loss (training's, or evaluation's where the detector gives one), and every evaluated image's ground
    truth and detections for COCO mAP over the split.

    Detections are not sums, so besides :meth:`sums` (``[loss sum, batches with a loss, images]``) the meter has a
    :meth:`payload` -- its per-image records -- that distributed evaluation gathers from every rank
    (:meth:`load_payloads`); mAP is then computed once over the whole split. Boxes are stored in the stored
    images' pixels (input boxes divided by the dataset's per-axis scale).
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        self.num_classes = int(num_classes)
        self.class_names = tuple(class_names) if class_names is not None else tuple(map(str, range(num_classes)))
        if len(self.class_names) != self.num_classes:
            raise ConfigError(f"detection meter: {len(self.class_names)} class names for {num_classes} classes")
        self.loss_sum, self.loss_n, self.n = 0.0, 0, 0
        self.records: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, loss: torch.Tensor, output: Any, target: torch.Tensor) -> None:
        batch = int(target.shape[0])
        value = float(loss.detach().float())
        if math.isfinite(value):
            self.loss_sum += value * batch
            self.loss_n += batch
        self.n += batch
        if isinstance(output, Mapping):  # training: torchvision's loss dict, no detections
            return
        t = target.detach().float().cpu().numpy()
        for det, rows in zip(output, t):
            sx, sy = float(rows[0, 7]), float(rows[0, 8])
            scale = np.array([sx, sy, sx, sy], np.float32)
            keep = rows[:, 0] >= 0
            g = rows[keep]
            xyxy = g[:, 1:5] / scale
            gt = np.concatenate(
                [xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2], g[:, 0:1], g[:, 5:6], g[:, 6:7]], axis=1
            ).astype(np.float32)
            boxes = det["boxes"].detach().float().cpu().numpy().reshape(-1, 4) / scale
            scores = det["scores"].detach().float().cpu().numpy().reshape(-1, 1)
            labels = det["labels"].detach().cpu().numpy().reshape(-1, 1).astype(np.float32)
            dt = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2], scores, labels], axis=1)
            self.records.append((gt, dt.astype(np.float32)))

    def sums(self) -> torch.Tensor:
        return torch.tensor([self.loss_sum, float(self.loss_n), float(self.n)], dtype=torch.float64)

    def load_sums(self, sums: torch.Tensor) -> None:
        if sums.numel() != 3:
            raise ValueError(f"detection meter sums have {sums.numel()} values, expected 3")
        self.loss_sum, self.loss_n, self.n = float(sums[0]), round(float(sums[1])), round(float(sums[2]))

    def payload(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return list(self.records)

    def load_payloads(self, payloads: Sequence[Any]) -> None:
        self.records = [r for p in payloads for r in p]

    def compute(self) -> dict[str, Any]:
        """``{"loss", "n", "map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ap": per-class list,
        "ap_per_class": {class name: AP}}`` (``None``: a class without a box in the split)."""
        out: dict[str, Any] = {"loss": self.loss_sum / self.loss_n if self.loss_n else float("nan"), "n": self.n}
        gts = [g for g, _ in self.records]
        dts = [d for _, d in self.records]
        out.update(coco_metrics(gts, dts, self.num_classes))
        out["ap_per_class"] = dict(zip(self.class_names, out["ap"]))
        return out


# --------------------------------------------------------------------------------------------------- pictures
#: detections at or above this score are drawn by :func:`save_detection_images` (COCO evaluation keeps all)
DRAW_SCORE_THRESH = 0.3


def save_detection_images(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    score_threshold: float = DRAW_SCORE_THRESH,
    limit: int | None = None,
) -> list[Path]:
    """Predict the images of a detection dataset and draw the boxes on each stored image as a PNG.

    For ``vpeft eval --save-masks DIR``: one ``<image file stem>.png`` per image in ``out_dir`` (``<stem>-2.png``
    ... when a joined split repeats a name), at the stored image's own resolution: the detections scoring at least
    ``score_threshold`` in their class's colour (:func:`vpeft.data.segmentation.default_palette`) labelled with
    class name and score, the true boxes (crowd regions included) 1 px white beneath them
    (:func:`vpeft.data.detection.draw_detections`, written atomically).

    Args:
        model: a :class:`DetectionModel` (evaluation output: torchvision's detections), already on ``device``.
        dataset: a :class:`~vpeft.data.detection.DetectionDataset` or a ``Subset`` of one.
        score_threshold: the lowest score drawn, in [0, 1].
        limit: draw at most this many images.

    Returns:
        The pictures written, in dataset order.
    """
    from ..data.detection import DetectionDataset, draw_detections
    from ..data.segmentation import default_palette

    base, indices = base_dataset(dataset)
    if not isinstance(base, DetectionDataset):
        raise ConfigError(f"save_detection_images needs a DetectionDataset, got {type(base).__name__}")
    if isinstance(score_threshold, bool) or not 0.0 <= float(score_threshold) <= 1.0:
        raise ConfigError(f"save_detection_images: score_threshold={score_threshold!r} must be in [0, 1]")
    indices = first_items(indices, limit, "save_detection_images")
    palette = default_palette(len(base.class_names))
    out_dir, written, used = Path(out_dir), [], set()
    for i, det in predict_items(model, base, indices, device, batch_size):
        rec = base.records.images[i]
        boxes, scores, labels = _detections_on_stored_image(base, rec, det, float(score_threshold))
        with Image.open(rec.path) as im:  # the stored image, at its own resolution
            image = im.convert("RGB")
        path = out_dir / unique_png(rec.path.stem, used)
        written.append(draw_detections(image, path, boxes, scores, labels, base.class_names, palette, truth=rec.boxes))
    return written


def _detections_on_stored_image(base, rec, det: Mapping[str, torch.Tensor], threshold: float):
    """``(boxes, scores, labels)`` of ``det`` scoring at least ``threshold``, in the stored image's pixels."""
    nw, nh = base.scaled_size(rec)
    scale = np.array([nw / rec.width, nh / rec.height] * 2, np.float32)
    scores = det["scores"].detach().float().cpu().numpy().reshape(-1)
    keep = scores >= threshold
    boxes = det["boxes"].detach().float().cpu().numpy().reshape(-1, 4)[keep] / scale
    labels = det["labels"].detach().cpu().numpy().reshape(-1)[keep]
    return boxes, scores[keep], labels


# ---------------------------------------------------------------------------------------------------------- task
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"detection: {name}={value!r} must be a positive int")
    return value


@register_task
class DetectionTask(Task):
    """Object detection with a torchvision detector on a feature pyramid of the backbone; COCO mAP.

    Args:
        class_names: the K object classes, in label order (from the folder's categories).
        detector: ``"fcos"``, ``"retinanet"`` or ``"faster_rcnn"`` (:data:`DETECTORS`).
        width: the pyramid / head width (default :func:`default_detection_width`); FCOS's GroupNorm head needs a
            multiple of 32.
        size: the canvas side ``S`` images are resized (longer side) and padded to (default: the backbone's input
            size, or the ``input_size`` the caller passes to :meth:`dataset`); a ViT needs a multiple of its patch;
            FCOS at least twice the coarsest stride (:attr:`DetectionModel.min_canvas`: 64 px at strides up to
            32), checked when the split is read and at every forward.
        augment: random horizontal flip of the training split (off by default).

    Task folders: see :mod:`vpeft.data.detection` (``annotations/<split>.json`` in COCO format + images).
    """

    kind: ClassVar[str] = "detection"
    primary_metric: ClassVar[str] = "map"
    detect_priority: ClassVar[int] = 20  # before segmentation and classification's generic fallback
    #: settings that only change how data is prepared: a delta trained with other values still fits the model
    DATA_OPTIONS: ClassVar[tuple[str, ...]] = ("size", "augment")

    def __init__(
        self,
        class_names: Sequence[str],
        detector: str = "fcos",
        width: int | None = None,
        size: int | None = None,
        augment: bool = False,
    ) -> None:
        if isinstance(class_names, str) or not class_names or not all(isinstance(c, str) for c in class_names):
            raise ConfigError(f"detection: class_names={class_names!r} must be a non-empty list of names")
        if detector not in DETECTORS:
            raise ConfigError(f"detection: unknown detector {detector!r}; valid detectors: {', '.join(DETECTORS)}")
        if width is not None:
            _positive_int("width", width)
            if detector == "fcos" and width % 32:
                raise ConfigError(
                    f"detection: width={width} must be a multiple of 32 for fcos (its GroupNorm(32) head)"
                )
        if size is not None:
            _positive_int("size", size)
        self.class_names, self.detector, self.width = tuple(class_names), detector, width
        self.size, self.augment = size, bool(augment)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- data ---------------------------------------------------------------------------------------------------
    @classmethod
    def matches_folder(cls, path: Path) -> bool:
        from ..data.detection import is_detection_folder

        return is_detection_folder(path)

    @classmethod
    def from_folder(cls, path: Path, **options: Any) -> DetectionTask:
        """The task of a detection folder: the classes from its categories; ``options`` as the constructor's."""
        from ..data.detection import DetectionFolder

        unknown = sorted(set(options) - {"detector", "width", "size", "augment"})
        if unknown:
            raise ConfigError(
                f"detection: unknown option(s) {', '.join(map(repr, unknown))}; "
                "valid task options: detector, width, size, augment"
            )
        return cls(DetectionFolder.from_dir(path).class_names, **options)

    def dataset(
        self, path: Path, split: str, model: nn.Module, *, input_size: int | None = None, train: bool = False
    ) -> Dataset:
        """``split`` of the folder as ``(canvas, padded targets)`` at :attr:`size` (else ``input_size``, else the
        backbone's), normalised with the backbone's mean/std; flipped at random when training with ``augment``."""
        from ..data.detection import DetectionFolder, load_detection_split

        folder = DetectionFolder.from_dir(path)
        if folder.class_names != self.class_names:
            raise ConfigError(
                f"detection folder {path} has the classes {list(folder.class_names)}, this task "
                f"{list(self.class_names)}"
            )
        size = self.size if self.size is not None else input_size
        data = load_detection_split(path, split, model, size=size, augment=self.augment and train, folder=folder)
        if isinstance(model, DetectionModel):
            model.check_canvas(data.size)  # before any training: FCOS refuses a canvas its pyramid is too coarse for
        return data

    def describe(self) -> str:
        return f"detection, {self.num_classes} classes, {self.detector}"

    def save_predictions(
        self, model: nn.Module, dataset: Dataset, out_dir: Path, *, device: str = "cpu", limit: int | None = None
    ) -> list[Path]:
        """The predicted boxes drawn on the stored images (:func:`save_detection_images`)."""
        return save_detection_images(model, dataset, out_dir, device=device, limit=limit)

    # ---- model, loss, metrics -----------------------------------------------------------------------------------
    def backbone_classes(self) -> int:
        """0: the backbone is built without a classifier; the detector predicts the classes."""
        return 0

    def backbone_kwargs(self) -> dict[str, Any]:
        """A canvas ``size`` other than the backbone's input size needs a ViT that takes any patch grid."""
        return {"dynamic_img_size": True} if self.size is not None else {}

    def build(self, backbone: nn.Module) -> DetectionModel:
        return DetectionModel(backbone, self)

    def forward(self, model: nn.Module, inputs: Any, targets: Any) -> Any:
        """``model(images, targets)``: training, torchvision's loss dict; evaluation, :class:`Detections` with the
        losses on the targets (FCOS, RetinaNet; none for Faster R-CNN)."""
        return model(inputs, targets)

    def comparable_output(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The neck's pyramid maps, flattened and joined: detections pass score thresholds and NMS, so an
        equivalent merge may still change which boxes survive; the maps the heads read may not."""
        maps = model.neck(inputs)
        return torch.cat([m.float().flatten(1) for m in maps.values()], dim=1)

    def torchvision_targets(self, targets: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """The padded ``(B, M, 9)`` targets as torchvision's per-image ``{"boxes", "labels"}`` (crowd boxes and
        padding removed; labels + 1 for Faster R-CNN)."""
        shift = 1 if self.detector == "faster_rcnn" else 0
        out = []
        for rows in targets:
            keep = (rows[:, 0] >= 0) & (rows[:, 5] == 0)
            out.append({"boxes": rows[keep, 1:5].float(), "labels": rows[keep, 0].long() + shift})
        return out

    def loss(self, output: Any, target: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
        """The sum of torchvision's losses: the training loss dict, or the losses :class:`Detections` carry from
        an evaluation forward; NaN for detections without losses (Faster R-CNN, or no targets given)."""
        losses = output if isinstance(output, Mapping) else getattr(output, "losses", None)
        if losses:
            return sum(v.float() for v in losses.values())  # type: ignore[return-value]
        return torch.tensor(float("nan"))

    def new_meter(self) -> DetectionMeter:
        return DetectionMeter(self.num_classes, self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "detector": self.detector,
            "width": self.width,
            "size": self.size,
            "augment": self.augment,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectionTask:
        return cls(**{k: v for k, v in data.items() if k not in ("kind", "num_classes")})

    def check_compatible(self, other: Mapping[str, Any], where: str) -> None:
        """A delta fits when it was trained for the same classes, detector and width (data options may differ)."""
        self.check_same_setup(other, where)
