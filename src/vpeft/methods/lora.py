"""LoRA: low-rank updates ``dW = (alpha / r) B A`` of chosen projections.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
Placement (paper default, also the standard VTAB-1k tables): W_q and W_v of every attention
layer, rank 8. timm fuses q, k and v into one ``qkv`` linear; vpeft adapts the q and v output
slices of it only (k untouched), which is exactly LoRA on separate q and v projections.
Initialisation: A Kaiming-uniform, B zero (identity at init). alpha = r gives scale 1.
ViT-B/16, r = 8 on q, v: 12 blocks * 2 * (8 * 768 + 768 * 8) = 294,912 parameters.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import get_module, set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_float, check_int, check_subset
from ..errors import UnsupportedBackboneError
from ..layers import LoRALinear
from ..registry import register_method
from .base import REPARAMETER, Method

QKV = ("q", "k", "v")
TARGETS = (*QKV, "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA.

    Attributes:
        r: rank (>= 1).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch input, in [0, 1).
        targets: projections to adapt in every block: any of q, k, v (slices of a fused qkv),
            proj, fc1, fc2. ``"qkv"`` is shorthand for q, k, v.
    """

    method = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        expanded = tuple(t for name in targets for t in (QKV if name == "qkv" else (name,)))
        object.__setattr__(self, "targets", expanded)
        super().__post_init__()

    def validate(self) -> None:
        check_int(self, "r", 1)
        check_float(self, "alpha", 0.0, low_open=True)
        check_float(self, "dropout", 0.0, 0.999)
        check_subset(self, "targets", TARGETS)


@register_method
class LoRA(Method):
    config_cls = LoRAConfig
    family = REPARAMETER
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022"
    mergeable = True
    kinds = ("vit",)

    def _wrap(self, model: nn.Module, name: str, slices: list[tuple[int, int]] | None) -> None:
        base = get_module(model, name)
        if not isinstance(base, nn.Linear):
            raise UnsupportedBackboneError(f"lora: {name} is a {type(base).__name__}, not a Linear layer")
        cfg = self.config
        set_module(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, slices))

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        targets, adapted = self.config.targets, []
        for parts in spec.parts:
            qkv_slices = [i for i, t in enumerate(QKV) if t in targets]
            if qkv_slices:
                if not parts.qkv:
                    raise UnsupportedBackboneError(f"lora: block {parts.block} has no fused qkv projection")
                width = get_module(model, parts.qkv).out_features // 3
                self._wrap(model, parts.qkv, [(i * width, (i + 1) * width) for i in qkv_slices])
                adapted.append(parts.qkv)
            for t in ("proj", "fc1", "fc2"):
                if t in targets:
                    name = getattr(parts, t)
                    if not name:
                        raise UnsupportedBackboneError(f"lora: block {parts.block} has no {t} projection")
                    self._wrap(model, name, None)
                    adapted.append(name)
        return adapted
