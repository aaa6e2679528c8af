"""What goes in and out of the server: image bytes -> an input tensor, an adapter's output -> its JSON answer.

Images are decoded with Pillow; anything that is not a complete image of at most ``max_pixels`` pixels raises an
:class:`ImageError` (:class:`ImageTooLargeError` for the size, HTTP 413) with one message, before any pixel is decoded
for the size check. Inputs are prepared as the adapter's task prepares its data: classification and zero-shot resize
straight to the input size with the backbone's interpolation (the VTAB-1k transform,
:func:`vpeft.data.build_transform`), segmentation bilinearly to its task's size; both normalised with the
backbone's mean and std.
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
    "answer",
    "classification_answer",
    "decode_base64",
    "decode_image",
    "parse_top_k",
    "segmentation_answer",
    "transform_for",
]


class ImageError(DataError):
    """The upload is not a usable image (the message says why)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the server takes."""


def decode_base64(text: Any) -> bytes:
    """The bytes of a base64 string (a ``data:...;base64,`` prefix is allowed)."""
    if not isinstance(text, str) or not text:
        raise ImageError("image must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image is not valid base64") from None


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


def answer(info: AdapterInfo, output: torch.Tensor, top_k: int, size: tuple[int, int]) -> Mapping[str, Any]:
    """The task's natural answer: segmentation masks, classes (classification, zero-shot and any other kind)."""
    if info.kind == "segmentation":
        return segmentation_answer(info, output, size)
    return classification_answer(info, output, top_k)
