"""Per-channel scale and shift of a layer's output (SSF, Lian et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Wrapper

__all__ = ["ScaleShift", "channel_dim_of"]

_CHANNEL_LAST = (nn.Linear, nn.LayerNorm)
_CHANNEL_FIRST = (nn.Conv2d,)


def _channel_first_norm(module: nn.Module) -> bool:
    try:  # timm's LayerNorm2d subclasses nn.LayerNorm but normalises the channels of an NCHW map
        from timm.layers import LayerNorm2d
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, LayerNorm2d)


def channel_dim_of(module: nn.Module) -> int | None:
    """Output channel dimension of a supported layer (-1: Linear/LayerNorm, 1: Conv2d/LayerNorm2d), else None."""
    if isinstance(module, _CHANNEL_FIRST) or _channel_first_norm(module):
        return 1
    if isinstance(module, _CHANNEL_LAST):
        return -1
    return None


def _num_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return int(module.normalized_shape[-1])


class ScaleShift(Wrapper):
    """``y = f(x) * gamma + beta`` per output channel.

    Initialisation follows the official SSF code: ``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)``
    (so SSF is *not* the identity at initialisation). Being linear in the output, it folds into the
    preceding Linear / Conv2d / LayerNorm: ``W' = diag(gamma) W``, ``b' = gamma * b + beta``.
    """

    mergeable = True
    stackable = True

    def __init__(self, base_layer: nn.Module, init_std: float = 0.02) -> None:
        super().__init__(base_layer)
        dim = channel_dim_of(base_layer)
        if dim is None:
            raise TypeError(f"ScaleShift cannot wrap {type(base_layer).__name__}")
        self.channel_dim = dim
        p = next(base_layer.parameters())
        c = _num_channels(base_layer)
        self.scale = nn.Parameter(torch.empty(c, device=p.device, dtype=p.dtype))
        self.shift = nn.Parameter(torch.empty(c, device=p.device, dtype=p.dtype))
        nn.init.normal_(self.scale, mean=1.0, std=init_std)
        nn.init.normal_(self.shift, mean=0.0, std=init_std)

    def _view(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return t
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return t.view(shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        return y * self._view(self.scale, y.ndim) + self._view(self.shift, y.ndim)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        base = self.base_layer
        if isinstance(base, nn.LayerNorm) and base.weight is None:
            raise TypeError("ScaleShift cannot merge into a LayerNorm without elementwise affine parameters")
        w = base.weight
        w.mul_(self.scale.view([-1] + [1] * (w.ndim - 1)))
        if base.bias is None:
            base.bias = nn.Parameter(torch.zeros_like(self.shift), requires_grad=False)
        base.bias.mul_(self.scale).add_(self.shift)
