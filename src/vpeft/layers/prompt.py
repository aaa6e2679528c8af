"""Learnable prompt tokens placed in a transformer's token sequence (VPT, Jia et al., ECCV 2022)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Wrapper

__all__ = ["PromptedBlock", "vpt_init_bound"]


def vpt_init_bound(patch_size: tuple[int, int], dim: int) -> float:
    """VPT's Xavier-uniform bound for prompts: ``sqrt(6 / (3 * patch_h * patch_w + dim))``."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))


class PromptedBlock(Wrapper):
    """Wraps one transformer block and edits the prompt tokens around it.

    Token layout: ``[prefix tokens (class, registers) | prompts | patch tokens]``.

    Args:
        base_layer: the block, ``[B, N, D] -> [B, N, D]``.
        num_prefix_tokens: class + register tokens kept in front.
        in_prompts: prompt tokens already present in the input (inserted by an earlier block).
        new_prompts: learnable tokens to put in their place (0: keep the incoming ones).
        dim: token width.
        bound: uniform initialisation bound (see :func:`vpt_init_bound`).
        strip: remove the prompts from the block's output (the last block does, so pooling and the
            head see the original token layout).
        dropout: dropout on the prompt tokens (VPT uses 0.1).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_prefix_tokens: int,
        in_prompts: int,
        new_prompts: int,
        dim: int,
        bound: float,
        strip: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base_layer)
        self.num_prefix_tokens, self.in_prompts, self.strip = num_prefix_tokens, in_prompts, strip
        self.prompt: nn.Parameter | None = None
        if new_prompts:
            p = next(base_layer.parameters())
            self.prompt = nn.Parameter(torch.empty(new_prompts, dim, device=p.device, dtype=p.dtype))
            nn.init.uniform_(self.prompt, -bound, bound)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def active_prompt(self) -> torch.Tensor | None:
        """The prompt tokens this block puts in (``None``: it keeps the incoming ones); a supernet's block returns
        the first ones of its largest set (:class:`vpeft.search.supernet.SuperPromptedBlock`)."""
        return self.prompt

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        n, present = self.num_prefix_tokens, self.in_prompts
        prompt = self.active_prompt()
        if prompt is not None:
            prompts = self.dropout(prompt).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :n], prompts, x[:, n + present :]], dim=1)
            present = prompt.shape[0]
        y = self.base_layer(x, *args, **kwargs)
        if self.strip and present:
            y = torch.cat([y[:, :n], y[:, n + present :]], dim=1)
        return y

    def extra_repr(self) -> str:
        new = 0 if self.prompt is None else self.prompt.shape[0]
        return f"in_prompts={self.in_prompts}, new_prompts={new}, strip={self.strip}"
