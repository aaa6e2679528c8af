"""SSF: Scaling & Shifting your Features (Lian et al., NeurIPS 2022).

Placement (official code): a per-channel scale and shift after every operation of the backbone:
the patch embedding, each block's norm1, qkv, proj, norm2, fc1, fc2, and the final norm -- i.e.
every Linear, Conv2d and LayerNorm outside the head. Initialisation: scale N(1, 0.02), shift
N(0, 0.02) (not the identity). Merged into the preceding layer after training.
ViT-B/16: 12 * 2 * (768 + 2304 + 768 + 768 + 3072 + 768) + 2 * 768 (patch embed) + 2 * 768
(final norm) = 205,824 parameters.

CNNs (the paper's ConvNeXt setting): after every Conv2d (depthwise ones included), Linear, LayerNorm and
timm LayerNorm2d outside the head. BatchNorm layers are not wrapped: vpeft freezes their statistics
(:class:`~vpeft.layers.FrozenStatsNorm`), so a frozen BatchNorm is a fixed per-channel affine map and a
scale-shift after it spans the same functions as the one after the convolution before it -- and timm's
``BatchNormAct2d`` applies its activation inside the module, where an outer scale-shift could not be
merged. Every scale-shift merges into its convolution (a bias is created where the conv has none).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_float
from ..layers import ScaleShift
from ..layers.scale_shift import channel_dim_of
from ..registry import register_method
from .base import REPARAMETER, Method


@dataclasses.dataclass(frozen=True)
class SSFConfig(MethodConfig):
    """SSF.

    Attributes:
        init_std: standard deviation of the scale (around 1) and shift (around 0) initialisation.
    """

    method = "ssf"
    init_std: float = 0.02

    def validate(self) -> None:
        check_float(self, "init_std", 0.0)


@register_method
class SSF(Method):
    config_cls = SSFConfig
    family = REPARAMETER
    paper = "Lian et al., Scaling & Shifting Your Features, NeurIPS 2022"
    mergeable = True
    identity_at_init = False
    kinds = ("vit", "swin", "cnn")

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        head = spec.head
        names = [
            name
            for name, module in model.named_modules()
            if channel_dim_of(module) is not None and not (head and (name == head or name.startswith(head + ".")))
        ]
        # a fused attention keeps its output, which its output projection reads: recompute that projection's
        # output in backward rather than keep it (one GEMM for one activation per block)
        shared = {p.proj for p in spec.parts if p.attention == "fused" and p.proj}
        for name in names:
            layer = ScaleShift(model.get_submodule(name), self.config.init_std)
            base = layer.base_layer
            if name in shared and isinstance(base, nn.Linear) and base.in_features == base.out_features:
                layer.recompute_base = True
            set_module(model, name, layer)
        return names
