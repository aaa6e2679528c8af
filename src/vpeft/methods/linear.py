"""Linear probing: train the classification head only.

Reference: Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019.
ViT-B/16 setting: 0 backbone parameters; the trainable count is the head alone
(768 * C + C; 76,900 for C = 100).
"""

from __future__ import annotations

import dataclasses

from ..config import MethodConfig
from ..registry import register_method
from .base import SPECIFICATION, Method


@dataclasses.dataclass(frozen=True)
class LinearConfig(MethodConfig):
    """Linear probe: no options."""

    method = "linear"


@register_method
class LinearProbe(Method):
    config_cls = LinearConfig
    family = SPECIFICATION
    paper = "Kornblith et al., Do Better ImageNet Models Transfer Better?, CVPR 2019"
    mergeable = True
