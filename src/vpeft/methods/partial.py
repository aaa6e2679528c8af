"""Partial-k: fine-tune the last k blocks (and what follows them) of the backbone.

References: Yosinski et al., "How transferable are features in deep neural networks?", NeurIPS
2014; He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (partial
fine-tuning). Default k = 1: on ViT-B/16 that is one block (7,087,872) plus the final LayerNorm
(1,536) = 7,089,408 parameters.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec
from ..config import MethodConfig, check_int
from ..errors import ConfigError
from ..registry import register_method
from .base import SPECIFICATION, Method


@dataclasses.dataclass(frozen=True)
class PartialConfig(MethodConfig):
    """Partial-k.

    Attributes:
        k: number of final blocks to train (>= 1; at most the backbone's depth).
    """

    method = "partial"
    k: int = 1

    def validate(self) -> None:
        check_int(self, "k", 1)


@register_method
class PartialK(Method):
    config_cls = PartialConfig
    family = SPECIFICATION
    paper = "Yosinski et al., NeurIPS 2014; He et al. (MAE partial fine-tuning), CVPR 2022"
    mergeable = True

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        if self.config.k > spec.depth:
            raise ConfigError(
                f"partial: k={self.config.k} exceeds the backbone's {spec.depth} blocks; use 1..{spec.depth}"
            )

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        prefixes = spec.blocks[-self.config.k :] + spec.post_blocks
        return [f"{prefix}.{name}" for prefix in prefixes for name, _ in model.get_submodule(prefix).named_parameters()]
