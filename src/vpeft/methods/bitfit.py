"""BitFit: train only the bias terms (of every layer that has one) and the head.

Reference: Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022. Biases are picked by module attribute
(``module.bias``), which covers Linear, Conv and LayerNorm/BatchNorm biases.
ViT-B/16: 102,912 parameters (per block 2304+768+3072+768 linear + 2*768 LayerNorm biases,
times 12, plus patch-embedding and final-norm biases).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec
from ..config import MethodConfig
from ..registry import register_method
from .base import SPECIFICATION, Method


@dataclasses.dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    """BitFit: no options."""

    method = "bitfit"


@register_method
class BitFit(Method):
    config_cls = BitFitConfig
    family = SPECIFICATION
    paper = "Ben Zaken et al., BitFit, ACL 2022"
    mergeable = True

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        names = []
        for mod_name, module in model.named_modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and any(p is bias for p in module.parameters(recurse=False)):
                names.append(f"{mod_name}.bias" if mod_name else "bias")
        return names
