"""Factor-tuning (FacT, Jie & Deng, AAAI 2023): all weight increments of a ViT as one factorised tensor.

FacT views every ``d x d`` weight slice of every block (q, k, v, o, the four slices of fc1 and of
fc2: ``12 L`` slices for mlp_ratio 4) as one ``12L x d x d`` tensor and learns its increment in a
factorised form whose outer factors ``U`` (``r x d``) and ``V`` (``d x r``) are shared by all slices:

* **TT** (tensor-train): ``dW_m = s * V S_m U`` with one ``r x r`` core ``S_m`` per slice;
* **TK** (Tucker): ``dW_m = s * V (C x_3 p_m) U`` with one ``r x r x r`` core ``C`` and one row
  ``p_m`` of an ``12L x r`` matrix ``P`` per slice.

The shared tensors live in one :class:`FacTFactors` module registered in every adapted layer (the
PyTorch way to tie weights: ``model.parameters()`` yields them once, under the first adapted
layer's name). Only that first layer reports them as its own trainable delta, so vpeft trains,
counts and saves each shared tensor exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .base import Wrapper

__all__ = ["FacTFactors", "FacTLinear", "FacTTTLinear", "FacTTKLinear"]


class FacTFactors(nn.Module):
    """The tensors shared by all adapted layers: ``u`` (``r x d``), ``v`` (``d x r``), and for TK the
    Tucker core ``core`` (``r x r x r``) and slice factor ``p`` (``n_slices x r``).

    Initialisation as the official code: ``u`` as ``nn.Linear(d, r)``'s default (Kaiming-uniform),
    ``v`` zero (so every increment is zero at init), ``core`` and ``p`` Xavier-uniform.
    """

    def __init__(self, dim: int, rank: int, num_slices: int = 0, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.dim, self.rank = dim, rank
        self.u = nn.Parameter(torch.empty(rank, dim, **kw))
        self.v = nn.Parameter(torch.zeros(dim, rank, **kw))
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        self.core: nn.Parameter | None = None
        self.p: nn.Parameter | None = None
        if num_slices:
            self.core = nn.Parameter(torch.empty(rank, rank, rank, **kw))
            self.p = nn.Parameter(torch.empty(num_slices, rank, **kw))
            nn.init.xavier_uniform_(self.core)
            nn.init.xavier_uniform_(self.p)

    def extra_repr(self) -> str:
        slices = 0 if self.p is None else self.p.shape[0]
        return f"dim={self.dim}, rank={self.rank}" + (f", tucker_slices={slices}" if slices else "")


class FacTLinear(Wrapper):
    """``y = W x + b + s * dW x`` for a frozen Linear of shape ``(a d) x (b d)``.

    The layer is ``a x b`` slices of ``d x d``; slice ``(i, j)`` gets ``V K_ij U`` where ``K`` is the
    layer's ``(a r) x (b r)`` core matrix (:meth:`core`). The forward pass never forms ``dW``:
    ``x`` is split into ``b`` chunks of ``d``, projected by ``U``, mixed by ``K``, dropped out (the
    official code's dropout sits after the core) and lifted by ``V`` into ``a`` chunks.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Linear, factors: FacTFactors, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        d = factors.dim
        if base_layer.out_features % d or base_layer.in_features % d:
            raise ValueError(
                f"FacT needs a Linear whose sizes are multiples of the width {d}, got "
                f"{base_layer.out_features} x {base_layer.in_features}"
            )
        self.factors = factors
        self.owns_factors = False
        self.out_blocks, self.in_blocks = base_layer.out_features // d, base_layer.in_features // d
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_slices(self) -> int:
        return self.out_blocks * self.in_blocks

    def delta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Own parameters; the shared factors only for the layer that owns them (one per model)."""
        for name, param in super().delta_parameters():
            if self.owns_factors or not name.startswith("factors."):
                yield name, param

    def core(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        f, a, b = self.factors, self.out_blocks, self.in_blocks
        lead = x.shape[:-1]
        z = (x.reshape(*lead, b, f.dim) @ f.u.transpose(0, 1)).flatten(-2)  # (..., b r)
        z = self.dropout(z @ self.core().transpose(0, 1))  # (..., a r)
        z = (z.reshape(*lead, a, f.rank) @ f.v.transpose(0, 1)).flatten(-2)  # (..., a d)
        return y + z * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense increment ``s * dW`` (``(a d) x (b d)``)."""
        f, a, b, r = self.factors, self.out_blocks, self.in_blocks, self.factors.rank
        k = self.core().reshape(a, r, b, r)
        dw = torch.einsum("or,irjs,se->ioje", f.v, k, f.u)
        return dw.reshape(a * f.dim, b * f.dim) * self.scale

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.base_layer.weight += self.delta_weight()

    def extra_repr(self) -> str:
        return f"blocks={self.out_blocks}x{self.in_blocks}, scale={self.scale:g}, owns_factors={self.owns_factors}"


class FacTTTLinear(FacTLinear):
    """FacT-TT: the layer's own ``r x r`` cores, one per slice, stored as one ``(a r) x (b r)`` matrix.

    Initialised as the official ``nn.Linear(r, r)`` / ``(r, 4r)`` / ``(4r, r)`` cores (PyTorch's
    default Kaiming-uniform, fan-in ``b r``).
    """

    def __init__(self, base_layer: nn.Linear, factors: FacTFactors, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, factors, scale, dropout)
        r = factors.rank
        kw = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.tt_core = nn.Parameter(torch.empty(self.out_blocks * r, self.in_blocks * r, **kw))
        nn.init.kaiming_uniform_(self.tt_core, a=math.sqrt(5))

    def core(self) -> torch.Tensor:
        return self.tt_core


class FacTTKLinear(FacTLinear):
    """FacT-TK: slice ``m`` of this layer uses core ``K_m = C x_3 p_m`` (rows ``offset..`` of ``P``)."""

    def __init__(
        self, base_layer: nn.Linear, factors: FacTFactors, offset: int, scale: float, dropout: float = 0.0
    ) -> None:
        super().__init__(base_layer, factors, scale, dropout)
        if factors.p is None or offset + self.num_slices > factors.p.shape[0]:
            raise ValueError(f"FacT-TK: slices {offset}..{offset + self.num_slices} exceed the shared factor P")
        self.offset = offset

    def core(self) -> torch.Tensor:
        f, a, b, r = self.factors, self.out_blocks, self.in_blocks, self.factors.rank
        rows = f.p[self.offset : self.offset + a * b]
        k = torch.einsum("oik,mk->moi", f.core, rows)  # (a b, r, r), slice m = i * b + j
        return k.reshape(a, b, r, r).permute(0, 2, 1, 3).reshape(a * r, b * r)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", slices={self.offset}..{self.offset + self.num_slices - 1}"
