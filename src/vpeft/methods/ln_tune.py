"""LN-Tune: train only the normalisation layers' affine parameters (and the head).

Reference: Basu et al., "Strong Baselines for Parameter Efficient Few-Shot Fine-tuning", AAAI 2024
(arXiv 2023). Norm layers are picked by type: LayerNorm, GroupNorm and BatchNorm (on CNNs the
BatchNorm affine parameters are tuned while their statistics stay frozen).
ViT-B/16: 38,400 parameters (4 * 768 per block * 12 + 2 * 768 for the final norm).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import BATCH_NORMS
from ..arch import ArchSpec
from ..config import MethodConfig
from ..registry import register_method
from .base import SPECIFICATION, Method

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, *BATCH_NORMS)


@dataclasses.dataclass(frozen=True)
class LNTuneConfig(MethodConfig):
    """LN-Tune: no options."""

    method = "ln_tune"


@register_method
class LNTune(Method):
    config_cls = LNTuneConfig
    family = SPECIFICATION
    paper = "Basu et al., Strong Baselines for Parameter Efficient Few-Shot Fine-tuning, AAAI 2024"
    mergeable = True

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        return [
            f"{mod_name}.{p_name}"
            for mod_name, module in model.named_modules()
            if isinstance(module, NORM_TYPES)
            for p_name, _ in module.named_parameters(recurse=False)
        ]
