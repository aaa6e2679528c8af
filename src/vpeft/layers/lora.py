"""Low-rank update of a linear layer (Hu et al., 2021), with per-slice adapters for fused layers."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .base import Wrapper

__all__ = ["LoRALinear"]


class LoRALinear(Wrapper):
    """``y = W x + b + (alpha / r) * B A x`` on chosen output slices of a frozen ``nn.Linear``.

    ``slices`` lists ``(start, stop)`` ranges of output features, each with its own ``A`` (r x in)
    and ``B`` (width x r) pair. A fused timm ``qkv`` projection adapted on q and v only uses the
    slices ``[(0, d), (2d, 3d)]``: the k rows receive no update, exactly as separate q and v
    projections would. ``A`` is Kaiming-uniform and ``B`` zero (the paper's initialisation), so the
    layer is the identity map of its base at initialisation.
    """

    mergeable = True

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        slices: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(base_layer)
        self.r, self.scaling = r, alpha / r
        self.slices = [tuple(s) for s in (slices or [(0, base_layer.out_features)])]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=w.dtype)) for _ in self.slices
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(stop - start, r, device=w.device, dtype=w.dtype)) for start, stop in self.slices
        )
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = self.dropout(x)
        for (start, stop), a, b in zip(self.slices, self.lora_A, self.lora_B):
            y[..., start:stop] += F.linear(F.linear(h, a), b) * self.scaling
        return y

    @torch.no_grad()
    def merge_into_base(self) -> None:
        w = self.base_layer.weight
        for (start, stop), a, b in zip(self.slices, self.lora_A, self.lora_B):
            w[start:stop] += (b @ a) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, slices={self.slices}"
