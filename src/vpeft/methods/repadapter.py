"""RepAdapter: linear group-wise adapters re-parameterised into the next projection.

Reference: Luo et al., "Towards Efficient Visual Adaption via Structural Re-parameterization",
arXiv 2302.08106, 2023; official code luogen1996/RepAdapter (``repadapter.py``).

Module (official ``RepAdapter``): ``x + s * conv_B(dropout(conv_A(x)))`` with 1x1 convolutions and
no non-linearity: ``conv_A`` dense ``d -> 8``, ``conv_B`` group-wise ``8 -> d`` with 2 groups;
dropout 0.1; ``conv_A`` Xavier-uniform with zero bias, ``conv_B`` weight and bias zero (identity at
init). Placement (official ``repblock``, the VTAB default): one adapter on ``norm1``'s output before
the attention and one on ``norm2``'s output before the MLP of every block (``placement="attn"`` is
the paper's RepAdapter_attn variant). Being linear, each adapter folds into the Linear that reads
its output -- timm's ``qkv`` (the attention's only input projection) and ``fc1`` -- which is what
the official ``set_RepWeight`` does after training; vpeft wraps ``qkv``/``fc1`` with the adapter on
their input, so merging re-parameterises it into exactly those layers.
Scale s: the class default of the official code is 1; its VTAB configs pick s per task from
{0.1, 0.5, 1, 5, 10} (``configs/repblock/*.yaml``).
ViT-B/16: per adapter 768 * 8 + 8 (down) + 768 * 4 + 768 (group-wise up) = 9,992; 24 adapters ->
239,808 parameters. The paper reports 0.22M, the weights alone (24 * (6,144 + 3,072) = 221,184);
the official code also trains the 18,624 bias terms counted here.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import get_module, set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_choice, check_float, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.repadapter import RepAdapterLinear
from ..registry import register_method
from .base import REPARAMETER, Method


@dataclasses.dataclass(frozen=True)
class RepAdapterConfig(MethodConfig):
    """RepAdapter.

    Attributes:
        dim: hidden width of the adapter (>= 1; divisible by ``groups``).
        groups: groups of the up-projection (>= 1; must divide ``dim`` and the embedding width).
        scale: multiplier s of the adapter branch (> 0).
        dropout: dropout between the two projections, in [0, 1) (official code: 0.1).
        placement: ``block`` (before attention and before the MLP) or ``attn`` (before attention only).
    """

    method = "repadapter"
    dim: int = 8
    groups: int = 2
    scale: float = 1.0
    dropout: float = 0.1
    placement: str = "block"

    def validate(self) -> None:
        check_int(self, "dim", 1)
        check_int(self, "groups", 1)
        if self.dim % self.groups:
            raise ConfigError(f"repadapter: groups={self.groups} must divide dim={self.dim}")
        check_float(self, "scale", 0.0, low_open=True)
        check_float(self, "dropout", 0.0, 0.999)
        check_choice(self, "placement", ("block", "attn"))


@register_method
class RepAdapter(Method):
    config_cls = RepAdapterConfig
    family = REPARAMETER
    paper = "Luo et al., Towards Efficient Visual Adaption via Structural Re-parameterization, 2023"
    mergeable = True
    kinds = ("vit", "swin")

    def _targets(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        names = []
        for parts in spec.parts:
            attn = get_module(model, parts.attn) if parts.attn else None
            if getattr(attn, "gate", None) is not None:
                raise UnsupportedBackboneError(
                    f"repadapter: {parts.attn} also reads its input through a gate, so an adapter on qkv's input "
                    f"would not be an adapter on the attention's input"
                )
            wanted = [("qkv", parts.qkv)] + ([("fc1", parts.fc1)] if self.config.placement == "block" else [])
            for what, name in wanted:
                if not isinstance(get_module(model, name) if name else None, nn.Linear):
                    raise UnsupportedBackboneError(f"repadapter: block {parts.block} has no {what} Linear layer")
                names.append(name)
        for name in names:  # the adapter's width is its layer's input width (Swin widens per stage)
            width = get_module(model, name).in_features
            if width % self.config.groups:
                raise ConfigError(f"repadapter: groups={self.config.groups} must divide the width {width} of {name}")
        return names

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        self._targets(model, spec)

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        cfg, names = self.config, self._targets(model, spec)
        for name in names:
            base = get_module(model, name)
            set_module(model, name, RepAdapterLinear(base, cfg.dim, cfg.groups, cfg.scale, cfg.dropout))
        return names
