"""Image transforms derived from a timm model's ``pretrained_cfg``.

The VTAB-1k protocol (Zhai et al., 2019; used by VPT, NOAH, SSF and most PEFT papers) resizes every image
directly to the network's input size — no centre crop — and uses no data augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import str_to_interp_mode
from torch import nn
from torchvision import transforms as T

from vpeft.arch import input_size
from vpeft.data.images import to_rgb
from vpeft.errors import ConfigError

__all__ = ["ToRGB", "build_transform", "resolve_input_size"]

logger = logging.getLogger(__name__)


class ToRGB:
    """Convert a PIL image to 3-channel RGB (grayscale, palette and RGBA images included).

    A class rather than a lambda so that transforms pickle into DataLoader worker processes.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_rgb(image)  # 16-bit and float modes scaled by their range, not clipped

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_DEFAULTS: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
}


def _data_config(model_or_cfg: nn.Module | Mapping[str, Any]) -> dict[str, Any]:
    """Resolve mean/std/interpolation/input_size, filling what is missing with timm's ImageNet defaults."""
    if isinstance(model_or_cfg, nn.Module):
        cfg = getattr(model_or_cfg, "pretrained_cfg", None) or getattr(model_or_cfg, "default_cfg", None) or {}
        data_cfg = _fill_defaults(cfg)
        # the size the model was built for (a timm ViT's patch embedding, a Hugging Face config): timm's
        # pretrained_cfg keeps the pre-trained resolution even when the model is created with another img_size
        data_cfg["input_size"] = (3, *input_size(model_or_cfg))
        return data_cfg
    if isinstance(model_or_cfg, Mapping):
        return _fill_defaults(model_or_cfg)
    raise ConfigError(
        f"build_transform expects an nn.Module with a pretrained_cfg or a config mapping, "
        f"got {type(model_or_cfg).__name__}"
    )


def _fill_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: cfg.get(key) if cfg.get(key) is not None else default for key, default in _DEFAULTS.items()}
    if isinstance(out["input_size"], int):
        out["input_size"] = (3, out["input_size"], out["input_size"])
    for key in ("mean", "std"):
        if len(tuple(out[key])) != 3:
            raise ConfigError(f"{key} must have 3 values (one per RGB channel), got {out[key]!r}")
    return out


def _check_patch_size(model: nn.Module, size: int) -> None:
    """Refuse an input side the model's patch embedding cannot take: smaller than a patch, or not a multiple of it
    (a dynamic-size timm model asserts mid-training; a fixed-size one silently drops the last rows and columns of
    pixels), unless the embedding pads (``dynamic_img_pad``)."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) and patch else patch
    if not isinstance(patch, int) or patch < 1:
        return
    pads = getattr(embed, "dynamic_img_pad", False)
    if size < patch or (not pads and size % patch):
        near = sorted({max(patch, size // patch * patch), (size // patch + 1) * patch})
        raise ConfigError(
            f"img_size {size} does not fit the backbone's {patch}-pixel patches: use a multiple of {patch} "
            f"(e.g. {' or '.join(map(str, near))})"
        )


def resolve_input_size(model_or_cfg: nn.Module | Mapping[str, Any], input_size: int | None = None) -> tuple[int, int]:
    """Return the ``(height, width)`` that :func:`build_transform` resizes to."""
    if input_size is not None:
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise ConfigError(f"input_size must be a positive int, got {input_size!r}")
        if isinstance(model_or_cfg, nn.Module):
            _check_patch_size(model_or_cfg, input_size)
        return input_size, input_size
    size = _data_config(model_or_cfg)["input_size"]
    return int(size[-2]), int(size[-1])


def build_transform(
    model_or_cfg: nn.Module | Mapping[str, Any],
    input_size: int | None = None,
    train: bool = False,
    augment: bool = False,
) -> T.Compose:
    """Build the image transform for a model, following the VTAB-1k protocol.

    RGB conversion -> resize straight to ``input_size x input_size`` (no crop) with the model's interpolation ->
    ``ToTensor`` -> ``Normalize(mean, std)``. With ``train=True`` and ``augment=True`` the resize is replaced by
    ``RandomResizedCrop(scale=(0.5, 1))`` followed by a horizontal flip. Augmentation is off by default because the
    VTAB-1k protocol uses none; ``augment`` is ignored for evaluation transforms (``train=False``).

    Args:
        model_or_cfg: A timm model (its ``pretrained_cfg`` is read; for ViT-style models the size the model was
            built for wins over the pre-trained one) or a ``pretrained_cfg``/data-config mapping with any of
            ``mean``, ``std``, ``interpolation``, ``input_size``. Missing keys take timm's ImageNet defaults.
        input_size: Square output size; overrides the config's.
        train: Whether the transform is for training.
        augment: Enable the simple flip + random-resized-crop augmentation (training only).

    Returns:
        A picklable ``torchvision.transforms.Compose`` mapping a PIL image to a float tensor ``(3, H, W)``.
    """
    cfg = _data_config(model_or_cfg)
    size = resolve_input_size(model_or_cfg, input_size)
    interp = str_to_interp_mode(cfg.get("interpolation") or "bicubic")
    if train and augment:
        geometry = [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interp), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(size, interpolation=interp)]
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    logger.debug("transform: size=%s interpolation=%s mean=%s std=%s augment=%s", size, interp, mean, std, augment)
    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(mean, std)])
