"""Linear segmentation head: BatchNorm + 1x1 convolution on the patch features.

DINOv2's linear semantic-segmentation evaluation (Oquab et al., "DINOv2: Learning Robust Visual Features without
Supervision", TMLR 2024, Sec. 7.4 "linear": a linear layer trained on the patch tokens of the frozen backbone,
predicting class logits per patch, bilinearly upsampled to the image; "+ms" concatenates the last four layers).
Here: the chosen maps are resized to the first one's size and concatenated, batch-normalised and mapped to the
class logits by a 1x1 convolution (weights N(0, 0.01^2), zero bias, as the usual ``conv_seg`` initialisation).
Trainable parameters: ``2C`` (BatchNorm) + ``C * K + K``; the BatchNorm running statistics are buffers of the
decoder and belong in its checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .base import register_decoder

__all__ = ["LinearDecoder"]


@register_decoder("linear")
class LinearDecoder(nn.Module):
    """``BN -> Dropout -> Conv1x1`` on the (concatenated) maps.

    Args:
        in_channels: widths of the maps it receives.
        num_classes: K.
        dropout: dropout on the features before the classifier, in [0, 1) (DINOv2: 0).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"linear decoder: dropout={dropout!r} must be in [0, 1)")
        channels = int(sum(in_channels))
        self.bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    summary = "DINOv2's linear head"

    @staticmethod
    def default_levels(kind: str, num_candidates: int) -> tuple[int, ...]:
        """The last level (DINOv2's linear evaluation)."""
        return (num_candidates - 1,)

    @classmethod
    def from_levels(cls, levels, num_classes: int, kind: str, dropout: float = 0.0) -> LinearDecoder:
        """Build for the :class:`~vpeft.tasks.dense.Level` s read (``kind`` is not needed by this head)."""
        return cls([lv.channels for lv in levels], num_classes, dropout=dropout)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        maps = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear") for f in feats]
        x = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
        return self.classifier(self.dropout(self.bn(x)))
