"""What goes in and out of the server: image bytes -> an input tensor, an adapter's output -> its JSON answer.

Images are decoded with Pillow; anything that is not a complete image of at most ``max_pixels`` pixels raises an
:class:`ImageError` (:class:`ImageTooLargeError` for the size, HTTP 413) with one message, before any pixel is decoded
for the size check. Inputs are prepared as the adapter's task prepares its data: classification and zero-shot resize
straight to the input size with the backbone's interpolation (the VTAB-1k transform,
:func:`vpeft.data.build_transform`), segmentation bilinearly to its task's size; both normalised with the
backbone's mean and std. Detection as :class:`vpeft.data.detection.DetectionDataset` prepares its images: the longer
side resized (bilinear) to the canvas side ``S``, normalised, padded at the bottom / right to ``S x S``; its boxes
are mapped back to the image's own pixels. A video adapter takes a clip -- a video file (any container PyAV reads)
or a list of frame images -- sampled as its task samples evaluation clips (:func:`vpeft.data.video.sample_indices`:
TSN segment centres, or a centred strided window; ``views`` clips) and each frame prepared like a classification
image.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from ..data import build_transform
from ..errors import ConfigError, DataError
from ..tasks.segmentation import resize_logits
from .store import AdapterInfo

__all__ = [
    "ImageError",
    "ImageTooLargeError",
    "VideoError",
    "answer",
    "canvas_scale",
    "classification_answer",
    "decode_base64",
    "decode_image",
    "decode_video",
    "detection_answer",
    "detection_canvas",
    "parse_top_k",
    "segmentation_answer",
    "transform_for",
    "video_clip",
]


class ImageError(DataError):
    """The upload is not a usable image (the message says why)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the server takes."""


class VideoError(ImageError):
    """The upload is not a usable clip (the message says why)."""


def decode_base64(text: Any, field: str = "image") -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` prefix is allowed); ``field`` names it in errors."""
    if not isinstance(text, str) or not text:
        raise ImageError(f"{field} must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{field} is not valid base64") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """A complete RGB image from ``data``; raises ImageError (ImageTooLargeError past ``max_pixels``)."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
            raise ImageTooLargeError(f"the image is too large ({exc})") from None
        raise ImageError("the upload is not an image Pillow can read (PNG, JPEG, WebP, BMP, GIF, TIFF ...)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad upload
        raise ImageError(f"the upload is not a readable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; this server takes at most {max_pixels}"
        )
    if width < 1 or height < 1:
        raise ImageError(f"the image is {width}x{height} pixels")
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise ImageError(f"the image is truncated or corrupt ({type(exc).__name__}: {exc})") from None


def parse_top_k(value: Any, default: int = 5) -> int:
    """``top_k`` from a JSON value or a form field: an integer >= 1 (``None``: ``default``)."""
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"top_k must be an integer >= 1, got {value!r}")
    return value


def transform_for(backbone: nn.Module, info: AdapterInfo, size: tuple[int, int]):
    """The input transform of an adapter (PIL image -> ``(3, H, W)`` float tensor)."""
    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    cfg["input_size"] = (3, *size)
    if info.kind == "segmentation":  # the segmentation folders' images: bilinear
        cfg["interpolation"] = "bilinear"
    return build_transform(cfg)


def canvas_scale(width: int, height: int, side: int) -> tuple[int, int]:
    """``(width, height)`` of an image resized so its longer side is ``side`` (the detection data's arithmetic)."""
    s = side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def detection_canvas(image: Image.Image, side: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(3, side, side)``: ``image`` resized (bilinear, aspect kept) into the top-left corner, normalised, zeros
    elsewhere (as :class:`vpeft.data.detection.DetectionDataset` prepares an image)."""
    nw, nh = canvas_scale(*image.size, side)
    resized = image.resize((nw, nh), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    canvas = torch.zeros(3, side, side)
    mean_t = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    canvas[:, :nh, :nw] = (x - mean_t) / std_t
    return canvas


def decode_video(data: bytes, indices_for, max_pixels: int, max_frames: int) -> list[Image.Image]:
    """The frames ``indices_for(n)`` of a video file's first video stream (``n``: its frame count, counted by
    demuxing), decoded with PyAV; raises VideoError (ImageTooLargeError past ``max_pixels`` per frame or
    ``max_frames`` frames)."""
    if not data:
        raise VideoError("the video is empty (0 bytes)")
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency of the video task
        raise VideoError("decoding videos needs PyAV (pip install av)") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError("the upload has no video stream")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"the video's frames are {width}x{height} = {width * height} pixels; this server takes at most "
                    f"{max_pixels}"
                )
            n = 0
            for packet in container.demux(stream):
                n += bool(packet.size)
                if n > max_frames:
                    raise ImageTooLargeError(f"the video has more than {max_frames} frames; this server takes at most "
                                             f"{max_frames}")  # fmt: skip
        if n == 0:
            raise VideoError("the video holds no frames")
        indices = [int(i) for i in indices_for(n)]
        wanted, got = set(indices), {}
        with av.open(io.BytesIO(data)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    got[k] = frame.to_image().convert("RGB")
                if k >= max(wanted):
                    break
    except ImageError:
        raise
    except DataError as exc:  # the sampling: a clip shorter than the frames the task samples
        raise VideoError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any demuxer / decoder failure is a bad upload
        raise VideoError(f"the upload is not a video PyAV can decode ({type(exc).__name__}: {exc})") from None
    if len(got) < len(wanted):
        raise VideoError(f"the video decoded to {len(got)} of the {len(wanted)} frames sampled")
    return [got[i] for i in indices]


def video_clip(frames: Sequence[Image.Image], transform) -> torch.Tensor:
    """``(N, 3, H, W)``: every frame through the per-frame ``transform``."""
    return torch.stack([transform(f) for f in frames])


def _label(classes: Sequence[str] | None, index: int) -> str | None:
    return classes[index] if classes is not None and index < len(classes) else None


def classification_answer(info: AdapterInfo, logits: torch.Tensor, top_k: int) -> dict[str, Any]:
    """The ``top_k`` classes by softmax probability: index, label (the class name when the delta records names,
    else ``None``) and score."""
    probs = torch.softmax(logits.float().flatten(), dim=0)
    scores, indices = probs.topk(min(top_k, probs.numel()))
    return {
        "predictions": [
            {"index": int(i), "label": _label(info.classes, int(i)), "score": float(s)}
            for s, i in zip(scores.tolist(), indices.tolist())
        ]
    }


def segmentation_answer(info: AdapterInfo, logits: torch.Tensor, size: tuple[int, int]) -> dict[str, Any]:
    """The predicted class of every pixel at the image's own ``(width, height)``, as a PNG of class indices
    (8-bit, 16-bit past 256 classes) in base64, with the classes present and their pixel fractions."""
    width, height = size
    scores = resize_logits(logits.float()[None], (height, width))[0]
    mask = scores.argmax(0).to(torch.int64).numpy()
    k = int(logits.shape[0])
    image = Image.fromarray(mask.astype(np.uint8)) if k <= 256 else Image.fromarray(mask.astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    counts = np.bincount(mask.ravel(), minlength=k)
    return {
        "mask_png": base64.b64encode(buf.getvalue()).decode("ascii"),
        "width": width,
        "height": height,
        "num_classes": k,
        "classes": info.classes,
        "present": [
            {"index": i, "label": _label(info.classes, i), "fraction": float(c) / mask.size}
            for i, c in enumerate(counts.tolist())
            if c
        ],
    }


def detection_answer(
    info: AdapterInfo, output: Mapping[str, torch.Tensor], size: tuple[int, int], side: int, top_k: int | None
) -> dict[str, Any]:
    """The detections by decreasing score, at most ``top_k`` (``None``: all the detector kept), each
    ``{"box": [x1, y1, x2, y2] in the image's own pixels, "index", "label", "score"}``."""
    width, height = size
    nw, nh = canvas_scale(width, height, side)
    scale = torch.tensor([nw / width, nh / height, nw / width, nh / height], dtype=torch.float64)
    limit = torch.tensor([width, height, width, height], dtype=torch.float64)
    boxes = (output["boxes"].double() / scale).clamp(min=0).minimum(limit)
    scores, labels = output["scores"].double(), output["labels"].long()
    order = torch.argsort(scores, descending=True, stable=True)
    if top_k is not None:
        order = order[:top_k]
    return {
        "detections": [
            {
                "box": boxes[i].tolist(),
                "index": int(labels[i]),
                "label": _label(info.classes, int(labels[i])),
                "score": float(scores[i]),
            }
            for i in order.tolist()
        ],
        "width": width,
        "height": height,
        "classes": info.classes,
    }


def answer(
    info: AdapterInfo, output: Any, top_k: int | None, size: tuple[int, int], side: int | None = None
) -> Mapping[str, Any]:
    """The task's natural answer: segmentation masks, detected boxes, classes (classification, zero-shot, video and
    any other kind). ``size``: the image's ``(width, height)``; ``side``: a detection canvas's side."""
    if info.kind == "segmentation":
        return segmentation_answer(info, output, size)
    if info.kind == "detection":
        return detection_answer(info, output, size, int(side or 0), top_k)
    return classification_answer(info, output, top_k or 5)
