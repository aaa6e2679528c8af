"""Low-rank update of a convolution (LoRA on ``Conv2d``), the layout of Hugging Face PEFT's conv LoRA."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from .base import Wrapper

__all__ = ["LoRAConv2d"]


class LoRAConv2d(Wrapper):
    """``y = conv(x) + (alpha / r) * B(A(x))`` for a frozen ``nn.Conv2d`` with ``groups == 1``.

    ``A`` is a convolution with the base layer's kernel size, stride, padding and dilation from the input
    channels to ``r`` channels (``r x in x kh x kw``, Kaiming-uniform), ``B`` a 1x1 convolution from ``r``
    to the output channels (``out x r x 1 x 1``, zero), so the layer is its base at initialisation. ``A``
    runs through the base module itself (``torch.func.functional_call``) and so gets its exact padding
    behaviour (padding modes, timm's dynamic "same" padding). The composition is one convolution with the
    kernel ``sum_j B[o, j] A[j, i, :, :]``, so it merges into the base weight.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Conv2d, r: int, alpha: float, dropout: float = 0.0) -> None:
        if not isinstance(base_layer, nn.Conv2d) or base_layer.groups != 1:
            groups = getattr(base_layer, "groups", None)
            raise TypeError(f"LoRAConv2d needs a Conv2d with groups=1, got {type(base_layer).__name__} groups={groups}")
        super().__init__(base_layer)
        self.r, self.scaling = r, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        kh, kw = base_layer.kernel_size
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_channels, kh, kw, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_channels, r, 1, 1, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        t = functional_call(self.base_layer, {"weight": self.lora_A, "bias": None}, (self.dropout(x),))
        return y + nn.functional.conv2d(t, self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` as a kernel of the base layer's shape."""
        b, a = self.lora_B.flatten(1), self.lora_A.flatten(1)
        return (b @ a).view_as(self.base_layer.weight) * self.scaling

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.weight += self.delta_weight()

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"
