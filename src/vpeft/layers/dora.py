"""Weight-decomposed low-rank adaptation (DoRA, Liu et al., ICML 2024) of a frozen ``nn.Linear``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .lora import LoRALinear

__all__ = ["DoRALinear"]


class DoRALinear(LoRALinear):
    """``W' = m * (W0 + s B A) / ||W0 + s B A||_c`` on chosen output slices of a frozen Linear.

    The norm is taken per output row over the input dimension (``dim=1`` of the ``out x in``
    weight), exactly as the official code and PEFT do, so ``m`` holds one magnitude per adapted
    output channel and is initialised to the row norms of ``W0``. ``A`` is Kaiming-uniform and ``B``
    zero (LoRA's initialisation), so at init ``W' = W0``.

    For a fused timm ``qkv`` adapted on q and v (``slices=[(0, d), (2d, 3d)]``) there is one
    magnitude vector per slice: the 2d rows of W_q and W_v are decomposed and re-normalised, the k
    rows are left exactly as they are. This equals DoRA applied to separate q and v projections.

    The forward pass is PEFT's: ``y + (m/n - 1) * (W0 x) + (m/n) * s B A x`` on each slice, with
    ``n`` detached from the graph when ``detach_norm`` (the paper's Sec. 4.3 memory saving, used by
    the official code). At init ``m/n`` is exactly 1 and the output is the frozen layer's, bit for bit.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        slices: list[tuple[int, int]] | None = None,
        detach_norm: bool = True,
    ) -> None:
        super().__init__(base_layer, r, alpha, dropout, slices)
        self.detach_norm = detach_norm
        w = base_layer.weight.detach()
        self.magnitude = nn.ParameterList(nn.Parameter(self._row_norm(w[start:stop])) for start, stop in self.slices)

    @staticmethod
    def _row_norm(weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight, dim=1)

    def directional_weight(self, i: int) -> torch.Tensor:
        """``W0 + s B A`` of slice ``i`` (rows of the frozen weight plus the low-rank update)."""
        start, stop = self.slices[i]
        return self.base_layer.weight[start:stop] + (self.lora_B[i] @ self.lora_A[i]) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        bias = self.base_layer.bias
        h = self.dropout(x)
        for i, ((start, stop), a, b, m) in enumerate(zip(self.slices, self.lora_A, self.lora_B, self.magnitude)):
            norm = self._row_norm(self.directional_weight(i))
            ratio = m / (norm.detach() if self.detach_norm else norm)
            base_out = y[..., start:stop].clone() if bias is None else y[..., start:stop] - bias[start:stop]
            lora_out = F.linear(F.linear(h, a), b) * self.scaling
            # add_ on the slice, not `y[...] += ...`: that writes back through __setitem__, which fails when y is
            # an autograd leaf (a frozen first layer, e.g. a Hugging Face q_proj) and the slice spans all of y
            y[..., start:stop].add_((ratio - 1) * base_out + ratio * lora_out)
        return y

    @torch.no_grad()
    def merge_into_base(self) -> None:
        merged = []
        for i, m in enumerate(self.magnitude):
            v = self.directional_weight(i)
            merged.append(v * (m / self._row_norm(v)).unsqueeze(1))
        for (start, stop), w in zip(self.slices, merged):
            self.base_layer.weight[start:stop] = w

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_norm={self.detach_norm}"
