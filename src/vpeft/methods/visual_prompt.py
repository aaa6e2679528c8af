"""Visual prompting in pixel space: a learnable padding prompt added to the input image.

Reference: Bahng et al., "Exploring Visual Prompts for Adapting Large-Scale Models", 2022
(arXiv 2203.17274); official code hjbahng/visual_prompting (``PadPrompter``).

Placement: the prompt is a frame of width ``p`` around the image -- four learnable strips (top and
bottom ``3 x p x W``, left and right ``3 x (H - 2p) x p``) with zeros inside -- added to the
normalised input image, i.e. to the input of the backbone's stem (``spec.stem[0]``: ``patch_embed``
of a ViT, ``conv_stem`` of an EfficientNet), so it works on CNNs too. Initialisation as the official
code: every strip N(0, 1) (``torch.randn``), so the method is not the identity at initialisation.

The prompt is built for the backbone's input size (:func:`vpeft.arch.input_size`: the size a ViT was built
for, the ``pretrained_cfg`` input size otherwise; ``image_size`` overrides it); the paper's width is 30 px at
224 px and the default ``pad_size=None`` keeps that ratio (``round(30 * side / 224)``). An input of
another size receives the prompt resampled bilinearly (with anti-aliasing). ``2 * pad_size`` must be
smaller than the image side.

ViT-B/16 at 224 px, p = 30: 2 * 3 * 30 * 224 + 2 * 3 * (224 - 60) * 30 = 69,840 parameters -- the
paper's 69,840 (0.04 M).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from .._modules import get_module, set_module
from ..arch import ArchSpec, input_size
from ..config import MethodConfig
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.base import Wrapper
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["VisualPromptConfig", "VisualPrompt", "PaddingPrompt", "PAPER_PAD", "PAPER_SIZE"]

PAPER_PAD, PAPER_SIZE = 30, 224


class PaddingPrompt(Wrapper):
    """Adds a learnable frame of width ``pad`` to the image before the wrapped stem module.

    Attribute lookups the wrapper cannot answer go to the stem (``patch_embed.img_size``,
    ``grid_size``, ``patch_size`` ... stay readable through the wrapper).
    """

    def __init__(self, base_layer: nn.Module, channels: int, size: tuple[int, int], pad: int) -> None:
        super().__init__(base_layer)
        h, w = size
        if not 0 < 2 * pad < min(h, w):
            raise ConfigError(f"PaddingPrompt: pad={pad} must be >= 1 and less than half of the {h}x{w} image side")
        p = next(base_layer.parameters())
        kw = {"device": p.device, "dtype": p.dtype}
        self.size, self.pad = (h, w), pad
        self.pad_up = nn.Parameter(torch.randn(channels, pad, w, **kw))
        self.pad_down = nn.Parameter(torch.randn(channels, pad, w, **kw))
        self.pad_left = nn.Parameter(torch.randn(channels, h - 2 * pad, pad, **kw))
        self.pad_right = nn.Parameter(torch.randn(channels, h - 2 * pad, pad, **kw))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def prompt(self) -> torch.Tensor:
        """The full prompt ``[C, H, W]``: the four strips around a zero centre."""
        h, w = self.size
        inner = self.pad_up.new_zeros(self.pad_up.shape[0], h - 2 * self.pad, w - 2 * self.pad)
        middle = torch.cat([self.pad_left, inner, self.pad_right], dim=2)
        return torch.cat([self.pad_up, middle, self.pad_down], dim=1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        prompt = self.prompt().unsqueeze(0)
        if tuple(x.shape[-2:]) != self.size:
            prompt = F.interpolate(
                prompt, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False, antialias=True
            )
        return self.base_layer(x + prompt.to(x.dtype), *args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, pad={self.pad}"


def _optional_int(cfg: MethodConfig, field: str, low: int) -> None:
    value = getattr(cfg, field)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise ConfigError(f"{cfg.method}: {field}={value!r} is invalid; expected null or an integer >= {low}")


@dataclasses.dataclass(frozen=True)
class VisualPromptConfig(MethodConfig):
    """Pixel-space padding prompt.

    Attributes:
        pad_size: frame width in pixels of the prompt (>= 1, and < half the image side);
            None: the paper's 30 px at 224 px, scaled to the image size.
        image_size: side of the (square) images the prompt is built for; None: the backbone's input size.
    """

    method = "visual_prompt"
    pad_size: int | None = None
    image_size: int | None = None

    def validate(self) -> None:
        _optional_int(self, "pad_size", 1)
        _optional_int(self, "image_size", 3)


@register_method
class VisualPrompt(Method):
    config_cls = VisualPromptConfig
    family = ADDITION
    paper = "Bahng et al., Exploring Visual Prompts for Adapting Large-Scale Models, 2022"
    identity_at_init = False
    kinds = ("vit", "swin", "cnn")

    def _geometry(self, model: nn.Module, spec: ArchSpec) -> tuple[tuple[int, int], int]:
        size = input_size(model, self.config.image_size)
        pad = self.config.pad_size
        if pad is None:
            pad = max(1, round(PAPER_PAD * min(size) / PAPER_SIZE))
        if 2 * pad >= min(size):
            raise ConfigError(
                f"visual_prompt: pad_size={pad} is invalid for {size[0]}x{size[1]} images; "
                f"expected 1 <= pad_size < {(min(size) + 1) // 2} (less than half the image side)"
            )
        return size, pad

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        if not spec.stem or not any(isinstance(m, nn.Conv2d) for m in get_module(model, spec.stem[0]).modules()):
            raise UnsupportedBackboneError(f"method {self.name!r} needs a convolutional stem taking the image")
        self._geometry(model, spec)  # a bad pad size fails before anything is frozen

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        name = spec.stem[0]
        stem = get_module(model, name)
        channels = next(m for m in stem.modules() if isinstance(m, nn.Conv2d)).in_channels
        size, pad = self._geometry(model, spec)
        set_module(model, name, PaddingPrompt(stem, channels, size, pad))
        return [name]
