"""RepAdapter (Luo et al. 2023): a linear, group-wise adapter re-parameterised into the next Linear."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Wrapper

__all__ = ["LinearGroupAdapter", "RepAdapterLinear"]


class LinearGroupAdapter(nn.Module):
    """``x + s * up(dropout(down(x)))`` with no non-linearity; ``up`` is group-wise.

    ``down``: dense ``dim -> hidden`` (the official 1x1 ``conv_A``), Xavier-uniform weight, zero bias.
    ``up``: ``hidden -> dim`` split into ``groups`` independent blocks (the official 1x1 ``conv_B``
    with ``groups``): output channels ``[g*dim/G, (g+1)*dim/G)`` read hidden channels
    ``[g*hidden/G, (g+1)*hidden/G)``. Weight ``(dim, hidden/G)`` as ``conv_B``'s, zero, and zero bias,
    so the adapter is the identity at initialisation.
    """

    def __init__(
        self, dim: int, hidden: int, groups: int, scale: float, dropout: float = 0.0, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        if hidden % groups or dim % groups:
            raise ValueError(f"LinearGroupAdapter: groups={groups} must divide hidden={hidden} and dim={dim}")
        kw = {"device": device, "dtype": dtype}
        self.dim, self.hidden, self.groups, self.scale = dim, hidden, groups, scale
        self.down = nn.Linear(dim, hidden, **kw)
        self.up_weight = nn.Parameter(torch.zeros(dim, hidden // groups, **kw))
        self.up_bias = nn.Parameter(torch.zeros(dim, **kw))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        g = self.groups
        hg = h.reshape(*h.shape[:-1], g, self.hidden // g)
        wg = self.up_weight.view(g, self.dim // g, self.hidden // g)
        return torch.einsum("...gc,goc->...go", hg, wg).flatten(-2) + self.up_bias

    def dense_up(self) -> torch.Tensor:
        """The block-diagonal ``dim x hidden`` matrix equivalent to the group-wise ``up``."""
        g = self.groups
        return torch.block_diag(*self.up_weight.view(g, self.dim // g, self.hidden // g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.dropout(self.down(x))) * self.scale

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``adapter(x) = M x + c`` in eval mode (dropout off)."""
        up = self.dense_up()
        eye = torch.eye(self.dim, device=up.device, dtype=up.dtype)
        return eye + (up @ self.down.weight) * self.scale, (up @ self.down.bias + self.up_bias) * self.scale


class RepAdapterLinear(Wrapper):
    """``f(adapter(x))``: a RepAdapter on the input of a frozen ``nn.Linear``.

    Placed on ``qkv`` it is RepAdapter "before the attention" (timm's attention reads its input
    only through ``qkv``); on ``fc1`` it is RepAdapter before the MLP. Merging re-parameterises the
    adapter into that Linear: ``W' = W M``, ``b' = W c + b`` where ``adapter(x) = M x + c``.

    Separate q, k, v projections (Hugging Face) all read the attention's input: they share ONE adapter
    (pass the first layer's ``adapter`` to the others). The shared adapter is registered in each of them
    (tied, as PyTorch ties weights); only the layer with ``owns_adapter`` reports it as its delta, so it is
    trained, counted and saved once, and each projection folds the same affine map when merged.
    """

    mergeable = True

    def __init__(
        self,
        base_layer: nn.Linear,
        hidden: int,
        groups: int,
        scale: float,
        dropout: float = 0.0,
        adapter: LinearGroupAdapter | None = None,
    ) -> None:
        super().__init__(base_layer)
        w = base_layer.weight
        self.owns_adapter = adapter is None
        if adapter is None:
            adapter = LinearGroupAdapter(
                base_layer.in_features, hidden, groups, scale, dropout, device=w.device, dtype=w.dtype
            )
        elif adapter.dim != base_layer.in_features:
            raise ValueError(f"RepAdapterLinear: the shared adapter has width {adapter.dim}, the layer {w.shape[1]}")
        self.adapter = adapter

    def delta_parameters(self):
        """Own parameters; a shared adapter only for the layer that owns it."""
        for name, param in super().delta_parameters():
            if self.owns_adapter or not name.startswith("adapter."):
                yield name, param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(self.adapter(x))

    @torch.no_grad()
    def merge_into_base(self) -> None:
        base = self.base_layer
        m, c = self.adapter.affine()
        shift = F.linear(c, base.weight)
        base.weight.copy_(base.weight @ m)
        if base.bias is None:
            base.bias = nn.Parameter(shift, requires_grad=False)
        else:
            base.bias += shift
