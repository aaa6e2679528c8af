"""A light feature-pyramid segmentation head (simple ViT pyramid + FPN + panoptic-FPN style fusion).

- **Simple feature pyramid** (ViTs only; Li, Mao, Girshick & He, "Exploring Plain Vision Transformer Backbones
  for Object Detection" (ViTDet), ECCV 2022, Sec. 3): a plain ViT has one scale (stride = patch size); four
  scales are made from it -- x4 by two stride-2 transposed convolutions (channel LayerNorm + GELU between),
  x2 by one, x1 identity, x1/2 by 2x2 max pooling -- i.e. strides 4/8/16/32 for patch 16. ViTDet builds all four
  from the last map; with several ViT levels (BEiT / MAE's UperNet set-up, blocks 3/6/9/12 of 12) scale ``j``
  is built from level ``j * n // 4``, shallow levels for fine scales. With one level this is exactly ViTDet.
- **Swin / CNN**: the stage maps are already a pyramid and feed the FPN directly.
- **FPN** (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017): 1x1 lateral convolutions to
  a common width, a top-down pathway (upsample the coarser level bilinearly and add), a 3x3 convolution per level.
- **Fusion** as the semantic branch of Panoptic FPN (Kirillov, Girshick, He & Dollar, "Panoptic Feature Pyramid
  Networks", CVPR 2019): every level upsampled to the finest one and summed, then dropout and a 1x1 classifier.
  UperNet (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018) concatenates instead and
  adds a pyramid pooling module on the top level; this "UperNet-lite" keeps the FPN and drops both (cheaper).

Norms are GroupNorm (Panoptic FPN; no running statistics, independent of the batch size), the pyramid's
channel LayerNorm as in ViTDet. The common width defaults to ``min(256, max(input widths) // 4)`` rounded down to
a multiple of 8 (ViT-S: 96, ViT-B: 192, EfficientNet with its 1280-wide head conv: 256), so it scales with the
backbone and stays light next to it (``benchmarks/bench_seg.py``, ViT-S/16, 224 px, batch 8, one CPU thread: the
head's training step costs 0.55x the backbone's forward at width 96, 1.16x at width 192 = ``d / 2``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .base import evenly_spaced, register_decoder

__all__ = ["FPNDecoder", "SimplePyramid", "default_width"]

SCALES: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)


def default_width(in_channels: Sequence[int]) -> int:
    """``min(256, max(in_channels) // 4)`` rounded down to a multiple of 8 (at least 8)."""
    return max(8, min(256, max(in_channels) // 4) // 8 * 8)


def _groups(channels: int, most: int = 32) -> int:
    """GroupNorm groups: the most (<= 32) that keep >= 4 channels per group (a 1x1 map still normalises)."""
    return max(g for g in range(1, max(1, min(most, channels // 4)) + 1) if channels % g == 0)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (ViTDet's norm in the simple pyramid)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_gn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(_groups(cout), cout), nn.ReLU(inplace=True)
    )


class SimplePyramid(nn.Module):
    """One scale of ViTDet's simple feature pyramid from a single-scale ViT map of width ``channels``.

    ``scale`` 4: ``ConvT(C, C/2) -> LN -> GELU -> ConvT(C/2, C/4)``; 2: ``ConvT(C, C/2)``; 1: identity;
    0.5: ``MaxPool 2x2``. :attr:`out_channels` is the resulting width.
    """

    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        half, quarter = max(1, channels // 2), max(1, channels // 4)
        if scale == 4.0:
            self.op = nn.Sequential(
                nn.ConvTranspose2d(channels, half, 2, stride=2),
                ChannelNorm(half),
                nn.GELU(),
                nn.ConvTranspose2d(half, quarter, 2, stride=2),
            )
            self.out_channels = quarter
        elif scale == 2.0:
            self.op, self.out_channels = nn.ConvTranspose2d(channels, half, 2, stride=2), half
        elif scale == 1.0:
            self.op, self.out_channels = nn.Identity(), channels
        elif scale == 0.5:
            self.op, self.out_channels = nn.MaxPool2d(2, ceil_mode=True), channels
        else:
            raise ConfigError(f"simple pyramid: scale {scale!r} must be one of {SCALES}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


@register_decoder("fpn")
class FPNDecoder(nn.Module):
    """Simple pyramid (ViTs) + FPN + summed fusion + classifier.

    Args:
        in_channels: widths of the maps received, shallow to deep.
        num_classes: K.
        vit: build the simple pyramid (ViT maps share one scale); otherwise the maps are the pyramid.
        width: common FPN width (default :func:`default_width` of the pyramid's widths).
        dropout: dropout before the classifier, in [0, 1) (0.1 as the usual decode heads).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        vit: bool,
        width: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"fpn decoder: dropout={dropout!r} must be in [0, 1)")
        n = len(in_channels)
        if vit:
            self.sources = tuple(j * n // len(SCALES) for j in range(len(SCALES)))
            self.pyramid = nn.ModuleList(SimplePyramid(in_channels[s], k) for s, k in zip(self.sources, SCALES))
            widths = [p.out_channels for p in self.pyramid]
        else:
            self.sources, self.pyramid, widths = tuple(range(n)), None, list(in_channels)
        if width is None:
            width = default_width(widths)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"fpn decoder: width={width!r} must be a positive int")
        self.width = width
        self.lateral = nn.ModuleList(_conv_gn_relu(c, width, 1) for c in widths)
        self.smooth = nn.ModuleList(_conv_gn_relu(width, width, 3) for _ in widths)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(width, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    summary = "ViTDet simple pyramid + FPN"

    @staticmethod
    def default_levels(kind: str, num_candidates: int) -> tuple[int, ...]:
        """On a ViT four evenly spaced blocks, e.g. 3/6/9/12 of 12 (BEiT / MAE's UperNet set-up); on Swin / CNNs
        the last four stages (strides 4..32 on the usual models)."""
        return evenly_spaced(kind, num_candidates, 4)

    @classmethod
    def from_levels(
        cls, levels, num_classes: int, kind: str, width: int | None = None, dropout: float = 0.1
    ) -> FPNDecoder:
        """Build for the :class:`~vpeft.tasks.dense.Level` s read from a ``kind`` backbone."""
        return cls([lv.channels for lv in levels], num_classes, vit=kind == "vit", width=width, dropout=dropout)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.pyramid is not None:
            xs = [p(feats[s]) for p, s in zip(self.pyramid, self.sources)]
        else:
            xs = list(feats)
        lat = [op(x) for op, x in zip(self.lateral, xs)]
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse to fine
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear")
        outs = [op(x) for op, x in zip(self.smooth, lat)]
        size = outs[0].shape[-2:]
        fused = outs[0]
        for o in outs[1:]:
            fused = fused + F.interpolate(o, size=size, mode="bilinear")
        return self.classifier(self.dropout(fused))
