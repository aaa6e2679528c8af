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

Separate q, k, v projections (Hugging Face): all three read the attention's input, so they share ONE adapter
(registered in each, owned -- trained, counted, saved -- by the first), and each folds the same affine map when
merged: the same function and parameter count as on a fused qkv. With dropout > 0 each projection draws its own
dropout mask in training (one adapter call per projection).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec, Target
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

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        # the attention's input projection(s) (one fused qkv, or separate q, k, v sharing one adapter) and fc1
        return ("qkv", "fc1") if self.config.placement == "block" else ("qkv",)

    def check_target(self, model: nn.Module, spec: ArchSpec, target: Target) -> None:
        parts = spec.parts[target.index]
        attn = model.get_submodule(parts.attn) if parts.attn else None
        if target.role == "qkv" and getattr(attn, "gate", None) is not None:
            raise UnsupportedBackboneError(
                f"repadapter: {parts.attn} also reads its input through a gate, so an adapter on qkv's input "
                f"would not be an adapter on the attention's input"
            )
        width = target.module.in_features  # the adapter's width is its layer's input width (Swin widens per stage)
        if width % self.config.groups:
            raise ConfigError(f"repadapter: groups={self.config.groups} must divide the width {width} of {target.name}")

    def prepare(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        self._shared: dict[tuple[int, str], RepAdapterLinear] = {}

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        cfg, key = self.config, (target.index, target.role)
        first = self._shared.get(key)
        layer = RepAdapterLinear(
            target.module, cfg.dim, cfg.groups, cfg.scale, cfg.dropout, first.adapter if first else None
        )
        self._shared.setdefault(key, layer)
        return layer

    def finish(self, model: nn.Module, spec: ArchSpec, adapted: list[str]) -> list[str]:
        # a shared adapter is reported (trained, saved) by the layer under which model.parameters() finds it first
        owners: set[int] = set()
        for module in model.modules():
            if isinstance(module, RepAdapterLinear):
                module.owns_adapter = id(module.adapter) not in owners
                owners.add(id(module.adapter))
        return adapted
