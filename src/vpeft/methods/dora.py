"""DoRA: weight-decomposed low-rank adaptation.

Reference: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024 (official code
NVlabs/DoRA; the same formulation as Hugging Face PEFT's ``use_dora``). Each adapted weight is
split into a magnitude and a direction: ``W' = m * (W0 + s B A) / ||W0 + s B A||_c``, the norm
taken per output row over the input dimension. ``m`` is initialised to ``||W0||_c`` and the
low-rank pair as LoRA's (A Kaiming-uniform, B zero), so the model is the frozen backbone at
initialisation. The norm is detached from the graph by default (the paper's Sec. 4.3 training-cost
reduction, used by the official code).

Placement: the same targets as LoRA, default W_q and W_v with r = 8 (alpha = r, scale 1). On
timm's fused ``qkv`` the q and v output slices get a low-rank pair and a magnitude vector each (2d
magnitudes); the k rows keep their frozen weight, so this is DoRA on separate q and v projections.
ViT-B/16, r = 8 on q, v: LoRA's 12 * 2 * (8 * 768 + 768 * 8) = 294,912 plus magnitudes
12 * 2 * 768 = 18,432 -> 313,344 parameters (the paper reports no ViT-B/16 VTAB count).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec, Target
from ..config import check_subset
from ..errors import ConfigError
from ..layers.dora import DoRALinear
from ..registry import register_method
from .base import REPARAMETER, Method
from .lora import VIT_TARGETS, LoRAConfig


@dataclasses.dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA: LoRA's options plus how the column norm enters the gradient.

    Attributes:
        r: rank of the directional update (>= 1).
        alpha: the update is multiplied by ``alpha / r``.
        dropout: dropout on the low-rank branch input, in [0, 1).
        targets: q, k, v (slices of a fused qkv), proj, fc1, fc2; ``"qkv"`` is shorthand for q, k, v.
        detach_norm: treat ``||W0 + s B A||_c`` as a constant in the backward pass (paper Sec. 4.3).
    """

    method = "dora"
    detach_norm: bool = True

    def validate(self) -> None:
        super().validate()
        check_subset(self, "targets", VIT_TARGETS)
        if not isinstance(self.detach_norm, bool):
            raise ConfigError(f"dora: detach_norm={self.detach_norm!r} is invalid; expected true or false")


@register_method
class DoRA(Method):
    config_cls = DoRAConfig
    family = REPARAMETER
    paper = "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024"
    mergeable = True
    kinds = ("vit", "swin")

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        return self.config.targets

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        cfg = self.config
        return DoRALinear(target.module, cfg.r, cfg.alpha, cfg.dropout, target.slice_list, cfg.detach_norm)
