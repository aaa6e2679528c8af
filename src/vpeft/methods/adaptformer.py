"""AdaptFormer: a bottleneck branch parallel to the MLP, scaled by s.

Reference: Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual
Recognition", NeurIPS 2022. Eq. 3: ``x = MLP(LN(x')) + s * ReLU(LN(x') W_down) W_up + x'`` -- the
branch reads the same LayerNorm output as the MLP, so it wraps the MLP module.
Initialisation as the official code: down Kaiming-uniform, up and biases zero (identity at init).
Default: bottleneck 8 (the VTAB-1k comparison tables; the official code's default is 64), s = 0.1.
ViT-B/16, bottleneck 8: 12 * (768*8 + 8 + 8*768 + 768) = 156,768 parameters.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec, Target
from ..config import MethodConfig, check_float, check_int
from ..layers import ParallelAdapter
from ..registry import register_method
from .base import ADDITION, Method


@dataclasses.dataclass(frozen=True)
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer.

    Attributes:
        bottleneck: hidden width of the parallel branch (>= 1).
        scale: the branch's output multiplier s (> 0).
    """

    method = "adaptformer"
    bottleneck: int = 8
    scale: float = 0.1

    def validate(self) -> None:
        check_int(self, "bottleneck", 1)
        check_float(self, "scale", 0.0, low_open=True)


@register_method
class AdaptFormer(Method):
    config_cls = AdaptFormerConfig
    family = ADDITION
    paper = "Chen et al., AdaptFormer, NeurIPS 2022"
    kinds = ("vit", "swin")

    roles = ("fc2", "mlp")  # the branch wraps the MLP; fc2 gives its width (per block: Swin widens per stage)

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module | None:
        if target.role != "mlp":
            return None
        width = model.get_submodule(spec.parts[target.index].fc2).out_features
        return ParallelAdapter(target.module, width, self.config.bottleneck, "relu", self.config.scale)
