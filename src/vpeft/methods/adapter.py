"""Sequential bottleneck adapter (Houlsby et al., ICML 2019; Pfeiffer et al., EACL 2021).

Placement: ``pfeiffer`` (default, as in the ViT VTAB-1k tables of NOAH): one adapter after the
MLP sub-layer of every block; ``houlsby``: after the attention and after the MLP sub-layers.
The adapter acts on the sub-layer output before the residual add: ``y + up(act(down(y)))``.
Initialisation: down Kaiming-uniform, up zero (identity at init).
ViT-B/16, bottleneck 8, Pfeiffer: 12 * (768*8 + 8 + 8*768 + 768) = 156,768 parameters.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec, Target
from ..config import MethodConfig, check_choice, check_float, check_int
from ..layers import SequentialAdapter
from ..layers.bottleneck import ACTIVATIONS
from ..registry import register_method
from .base import ADDITION, Method


@dataclasses.dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """Sequential adapter.

    Attributes:
        bottleneck: hidden width of the adapter (>= 1).
        placement: ``pfeiffer`` (after the MLP) or ``houlsby`` (after attention and MLP).
        act: non-linearity: relu, gelu or silu.
        scale: multiplier of the adapter output.
    """

    method = "adapter"
    bottleneck: int = 8
    placement: str = "pfeiffer"
    act: str = "gelu"
    scale: float = 1.0

    def validate(self) -> None:
        check_int(self, "bottleneck", 1)
        check_choice(self, "placement", ("pfeiffer", "houlsby"))
        check_choice(self, "act", tuple(ACTIVATIONS))
        check_float(self, "scale", 0.0, low_open=True)


@register_method
class Adapter(Method):
    config_cls = AdapterConfig
    family = ADDITION
    paper = "Houlsby et al., ICML 2019; Pfeiffer et al., AdapterFusion, EACL 2021"
    kinds = ("vit", "swin")

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        # the sub-layers to follow, and their output projections (the width, read per block: Swin widens per stage)
        return ("attn", "proj", "mlp", "fc2") if self.config.placement == "houlsby" else ("mlp", "fc2")

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module | None:
        if target.role not in ("attn", "mlp"):
            return None
        cfg, parts = self.config, spec.parts[target.index]
        width = model.get_submodule(parts.proj if target.role == "attn" else parts.fc2).out_features
        return SequentialAdapter(target.module, width, cfg.bottleneck, cfg.act, cfg.scale)
