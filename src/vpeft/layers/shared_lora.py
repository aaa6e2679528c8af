"""LoRA on a *virtual* fused projection: one down-projection ``A`` shared by layers that read the same input.

A LoRA of rank ``r`` on a fused ``qkv`` (``A``: r x d, ``B``: 3d x r) is, on a backbone with separate q, k, v
projections, three layers sharing ``A`` and each holding its rows of ``B``: ``y_t = W_t x + s B_t (A x)``.
:class:`SharedALoRALinear` is one such layer. The shared :class:`SharedDown` is registered in every layer (tied,
as PyTorch ties weights); only the layer with ``owns_down`` reports it as its delta, so it is trained, counted
and saved once. Same function, parameters and initialisation as the fused LoRA (``A`` Kaiming-uniform, ``B``
zero: the identity at initialisation); mergeable (``W_t += s B_t A``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .base import Wrapper

__all__ = ["SharedDown", "SharedALoRALinear"]


class SharedDown(nn.Module):
    """The shared ``A`` (``r x in_features``), Kaiming-uniform as ``nn.Linear`` / LoRA's ``A``."""

    def __init__(self, in_features: int, r: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, r={self.weight.shape[0]}"


class SharedALoRALinear(Wrapper):
    """``y = W x + b + scale * B (A x)`` with ``A`` from a :class:`SharedDown` and this layer's own ``B`` (zero)."""

    mergeable = True

    def __init__(self, base_layer: nn.Linear, down: SharedDown, scale: float = 1.0) -> None:
        super().__init__(base_layer)
        r, in_features = down.weight.shape
        if in_features != base_layer.in_features:
            raise ValueError(f"SharedALoRALinear: A reads {in_features} features, the layer {base_layer.in_features}")
        w = base_layer.weight
        self.down, self.owns_down, self.scale = down, False, scale
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=w.device, dtype=w.dtype))

    def delta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Own parameters; the shared ``A`` only for the layer that owns it."""
        for name, param in super().delta_parameters():
            if self.owns_down or not name.startswith("down."):
                yield name, param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + F.linear(F.linear(x, self.down.weight), self.lora_B) * self.scale

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.weight += (self.lora_B @ self.down.weight) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.lora_B.shape[1]}, scale={self.scale:g}, owns_down={self.owns_down}"
