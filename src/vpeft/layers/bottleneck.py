"""Bottleneck adapters: down-projection, non-linearity, zero-initialised up-projection."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Wrapper, input_of, map_output

__all__ = ["Bottleneck", "SequentialAdapter", "ParallelAdapter"]

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """``up(act(down(x)))`` with ``down`` Kaiming-uniform, ``up`` and both biases zero.

    Zero ``up`` makes the adapter output exactly zero at initialisation, so the adapted network
    starts as the pre-trained one (Houlsby et al. 2019 initialise near-identity; AdaptFormer's
    official code uses this exact zero-``up`` scheme).
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu", *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Linear(dim, hidden, **kw)
        self.act = _ACTS[act]()
        self.up = nn.Linear(hidden, dim, **kw)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def _like(module: nn.Module) -> dict:
    p = next(module.parameters())
    return {"device": p.device, "dtype": p.dtype}


class SequentialAdapter(Wrapper):
    """Adapter after a sub-layer: ``y = f(x); return y + s * adapter(y)`` (Houlsby / Pfeiffer)."""

    def __init__(self, base_layer: nn.Module, dim: int, hidden: int, act: str = "gelu", scale: float = 1.0) -> None:
        super().__init__(base_layer)
        self.adapter = Bottleneck(dim, hidden, act, **_like(base_layer))
        self.scale = scale

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return map_output(self.base_layer(*args, **kwargs), lambda y: y + self.adapter(y) * self.scale)


class ParallelAdapter(Wrapper):
    """Adapter beside a sub-layer: ``return f(x) + s * adapter(x)`` (AdaptFormer's AdaptMLP)."""

    def __init__(self, base_layer: nn.Module, dim: int, hidden: int, act: str = "relu", scale: float = 0.1) -> None:
        super().__init__(base_layer)
        self.adapter = Bottleneck(dim, hidden, act, **_like(base_layer))
        self.scale = scale

    def forward(self, *args, **kwargs) -> torch.Tensor:
        x = input_of(self.base_layer, args, kwargs)
        return map_output(self.base_layer(*args, **kwargs), lambda y: y + self.adapter(x) * self.scale)
