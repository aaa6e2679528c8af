"""Full fine-tuning: every parameter is trained (the baseline PEFT methods are compared with).

ViT-B/16: 85,798,656 backbone parameters + head.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec
from ..config import MethodConfig
from ..registry import register_method
from .base import SPECIFICATION, Method


@dataclasses.dataclass(frozen=True)
class FullConfig(MethodConfig):
    """Full fine-tuning: no options."""

    method = "full"


@register_method
class FullFineTuning(Method):
    config_cls = FullConfig
    family = SPECIFICATION
    paper = "baseline: full fine-tuning of every pre-trained weight"
    mergeable = True
    freeze_norm_stats = False
    saves_buffers = True

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        return [name for name, _ in model.named_parameters()]
