"""Learned per-channel scaling of a frozen ``nn.Linear``'s output slices or input (DiffFit, IA3).

Both wrappers start at ones (the identity) and fold exactly into the wrapped Linear:
scaling output channel ``o`` by ``l_o`` scales row ``o`` of the weight and the bias; scaling input
channel ``i`` by ``l_i`` scales column ``i`` of the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Wrapper

__all__ = ["OutputScale", "InputScale"]


def _like(layer: nn.Linear) -> dict:
    return {"device": layer.weight.device, "dtype": layer.weight.dtype}


class OutputScale(Wrapper):
    """``y = f(x)`` with ``y[..., start:stop] *= l`` for each chosen output slice (``l`` init 1).

    ``slices=None`` scales every output channel (DiffFit's gamma after ``proj`` / ``fc2``); IA3 on a
    fused timm ``qkv`` uses the k and v slices ``[(d, 2d), (2d, 3d)]`` and leaves q untouched.
    Channels outside the slices are multiplied by a constant 1.
    """

    mergeable = True
    #: only transforms the base layer's output (merging folds into whatever Linear is below once that is merged)
    stackable = True

    def __init__(self, base_layer: nn.Linear, slices: list[tuple[int, int]] | None = None) -> None:
        super().__init__(base_layer)
        out = base_layer.out_features
        self.slices = sorted(tuple(s) for s in (slices or [(0, out)]))
        if any(a >= b for a, b in self.slices) or any(b > c for (_, b), (c, _) in zip(self.slices, self.slices[1:])):
            raise ValueError(f"OutputScale: slices {self.slices} must be non-empty, sorted and disjoint")
        if self.slices[-1][1] > out:
            raise ValueError(f"OutputScale: slice {self.slices[-1]} exceeds the layer's {out} outputs")
        self.scales = nn.ParameterList(
            nn.Parameter(torch.ones(stop - start, **_like(base_layer))) for start, stop in self.slices
        )

    def factor(self) -> torch.Tensor:
        """The full per-output-channel multiplier (ones outside the slices)."""
        out, parts, pos = self.base_layer.out_features, [], 0
        for (start, stop), scale in zip(self.slices, self.scales):
            if start > pos:
                parts.append(torch.ones(start - pos, device=scale.device, dtype=scale.dtype))
            parts.append(scale)
            pos = stop
        if pos < out:
            parts.append(torch.ones(out - pos, device=parts[-1].device, dtype=parts[-1].dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.factor()

    @torch.no_grad()
    def merge_into_base(self) -> None:
        base = self.base_layer
        for (start, stop), scale in zip(self.slices, self.scales):
            base.weight[start:stop] *= scale.unsqueeze(1)
            if base.bias is not None:
                base.bias[start:stop] *= scale

    def extra_repr(self) -> str:
        return f"slices={self.slices}"


class InputScale(Wrapper):
    """``y = f(x * l)`` with one learned factor per input channel (``l`` init 1).

    IA3 rescales the FFN's hidden activation; applied to ``fc2``'s input it merges into ``fc2``'s
    weight columns: ``W' = W diag(l)``.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.scale = nn.Parameter(torch.ones(base_layer.in_features, **_like(base_layer)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x * self.scale)

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.weight *= self.scale.unsqueeze(0)
