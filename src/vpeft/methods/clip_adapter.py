"""CLIP-Adapter: a residual bottleneck MLP on CLIP's frozen image feature.

Reference: Gao, Geng, Zhang, Ma, Fang, Zhang, Li & Qiao, "CLIP-Adapter: Better Vision-Language Models with Feature
Adapters", IJCV 2023. ``f' = alpha * A(f) + (1 - alpha) * f`` with ``A = ReLU(W_2 ReLU(W_1 f))``, bias-free
``W_1: E -> E / 4``, ``W_2: E / 4 -> E``; residual ratio alpha = 0.2 (the paper's choice for most data sets). The
classifier stays zero-shot CLIP's (text features of the class prompts). The towers are not touched: the adapter takes
the backbone's ``image_adapter`` slot, after the projection.
CLIP ViT-B/16 (E = 512): 512 * 128 + 128 * 512 = 131,072.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._modules import set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_float, check_int
from ..layers import Wrapper
from ..registry import register_method
from .base import ADDITION, Method
from .towers import check_clip


class FeatureAdapter(Wrapper):
    """``alpha * ReLU(W_2 ReLU(W_1 f)) + (1 - alpha) * base_layer(f)`` on a feature vector."""

    def __init__(self, base_layer: nn.Module, dim: int, reduction: int, ratio: float) -> None:
        super().__init__(base_layer)
        hidden = max(1, dim // reduction)
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True), nn.Linear(hidden, dim, bias=False), nn.ReLU()
        )
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.base_layer(x)
        return self.ratio * self.fc(f) + (1.0 - self.ratio) * f


@dataclasses.dataclass(frozen=True)
class CLIPAdapterConfig(MethodConfig):
    """CLIP-Adapter (visual adapter).

    Attributes:
        reduction: bottleneck width is E // reduction (paper: 4).
        ratio: residual ratio alpha in (0, 1] (paper: 0.2).
    """

    method = "clip_adapter"
    reduction: int = 4
    ratio: float = 0.2

    def validate(self) -> None:
        check_int(self, "reduction", 1)
        check_float(self, "ratio", 0.0, 1.0, low_open=True)


@register_method
class CLIPAdapter(Method):
    config_cls = CLIPAdapterConfig
    family = ADDITION
    paper = "Gao et al., CLIP-Adapter: Better Vision-Language Models with Feature Adapters, IJCV 2023"
    identity_at_init = False
    kinds = ("vit",)
    towers = ("image",)

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        check_clip(self, model, spec, slot="image_adapter")

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        cfg = self.config
        adapter = FeatureAdapter(model.image_adapter, model.embed_dim, cfg.reduction, cfg.ratio)
        set_module(model, "image_adapter", adapter.to(model.device))
        return ["image_adapter"]
