"""Run 2-D (convolutional) operators on a ViT's token sequence laid out on its patch grid.

Convpass and Mona apply convolutions to the patch tokens of a plain ViT. A sequence
``[B, N, C]`` holds ``num_prefix`` class/register tokens followed by ``h * w`` patch tokens in
row-major order (timm's and Hugging Face's layout); the grid the backbone was built for comes from its ArchSpec
(:func:`vpeft.arch.patch_grid`). The patch tokens are reshaped to ``[B, C, h, w]``; each prefix
token has no spatial neighbours, so it runs through the same operator as its own ``1 x 1`` image
(zero padding: only the kernel centres act on it). This is exactly what the official Convpass
code does with the class token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["infer_grid", "map_on_grid"]

Grid = tuple[int, int]


def infer_grid(num_patches: int, grid: Grid | None) -> Grid:
    """``grid`` when it holds ``num_patches`` tokens, else the square grid; anything else is an error."""
    if grid is not None and grid[0] * grid[1] == num_patches:
        return grid
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise ValueError(
        f"{num_patches} patch tokens fit neither the backbone's {grid} patch grid nor a square grid; "
        "token-grid adapters need the plain [prefix tokens | patch tokens] layout"
    )


def map_on_grid(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_prefix: int, grid: Grid | None
) -> torch.Tensor:
    """Apply ``fn`` (``[B, C, H, W] -> [B, C', H, W]``) to the tokens ``x`` (``[B, N, C]``), returning ``[B, N, C']``.

    Patch tokens are processed on their grid; every prefix token as a separate ``1 x 1`` image.
    """
    b, n, c = x.shape
    h, w = infer_grid(n - num_prefix, grid)
    patches = x[:, num_prefix:].transpose(1, 2).reshape(b, c, h, w)
    out = fn(patches).flatten(2).transpose(1, 2)
    if num_prefix == 0:
        return out
    prefix = fn(x[:, :num_prefix].reshape(b * num_prefix, c, 1, 1)).reshape(b, num_prefix, -1)
    return torch.cat([prefix, out], dim=1)
