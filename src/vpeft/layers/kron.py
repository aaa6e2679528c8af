"""Kronecker-product update of a frozen linear layer (KronA, Edalati et al. 2022)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Wrapper

__all__ = ["KronALinear"]


class KronALinear(Wrapper):
    """``y = W x + b + s * (A kron B) x`` on chosen output slices of a frozen ``nn.Linear``.

    ``A`` is ``a1 x a2`` and ``B`` is ``(width / a1) x (in / a2)``, so ``A kron B`` has the shape of
    the slice's weight. The product is never formed in the forward pass: with ``x`` viewed as an
    ``a2 x b2`` matrix ``X`` (row-major), ``(A kron B) x = vec(A X B^T)``. ``A`` is Kaiming-uniform
    and ``B`` zero, so the layer is its base at initialisation; merging adds ``s * torch.kron(A, B)``.
    """

    mergeable = True

    def __init__(
        self,
        base_layer: nn.Linear,
        a_shape: tuple[int, int],
        scale: float = 1.0,
        slices: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(base_layer)
        a1, a2 = a_shape
        self.slices = [tuple(s) for s in (slices or [(0, base_layer.out_features)])]
        in_features = base_layer.in_features
        for start, stop in self.slices:
            if (stop - start) % a1 or in_features % a2:
                raise ValueError(
                    f"KronA factor A of shape {a_shape} does not tile a {stop - start} x {in_features} weight "
                    f"(a1 must divide the output width and a2 the input width)"
                )
        self.a_shape, self.scale = (a1, a2), scale
        w = base_layer.weight
        kw = {"device": w.device, "dtype": w.dtype}
        self.kron_A = nn.ParameterList(nn.Parameter(torch.empty(a1, a2, **kw)) for _ in self.slices)
        self.kron_B = nn.ParameterList(
            nn.Parameter(torch.zeros((stop - start) // a1, in_features // a2, **kw)) for start, stop in self.slices
        )
        for a in self.kron_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a2 = self.a_shape[1]
        xm = x.reshape(*x.shape[:-1], a2, x.shape[-1] // a2)
        if self.slices == [(0, y.shape[-1])]:  # the whole output (a separate q/k/v projection): out of place
            return y + (self.kron_A[0] @ xm @ self.kron_B[0].transpose(0, 1)).flatten(-2) * self.scale
        for (start, stop), a, b in zip(self.slices, self.kron_A, self.kron_B):
            delta = (a @ xm @ b.transpose(0, 1)).flatten(-2)
            y[..., start:stop] += delta * self.scale
        return y

    def delta_weight(self, i: int) -> torch.Tensor:
        """The dense update ``s * (A kron B)`` of slice ``i``."""
        return torch.kron(self.kron_A[i], self.kron_B[i]) * self.scale

    @torch.no_grad()
    def merge_into_base(self) -> None:
        w = self.base_layer.weight
        for i, (start, stop) in enumerate(self.slices):
            w[start:stop] += self.delta_weight(i)

    def extra_repr(self) -> str:
        return f"a_shape={self.a_shape}, scale={self.scale:g}, slices={self.slices}"
