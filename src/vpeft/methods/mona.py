"""Mona: the multi-cognitive visual adapter.

Reference: Yin et al., "5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual
Recognition Tasks", CVPR 2025 (arXiv 2408.08345, first version 2023); official code Leiyi-Hu/mona
(``Mona``/``MonaOp`` in its Swin backbones).

Module (official ``Mona.forward``): ``y = x + up(dropout(GELU(MonaOp(down(LN(x) * gamma + x * gammax)))))``
with its own LayerNorm over d, ``gamma`` (init 1e-6) and ``gammax`` (init 1) per channel, down d -> 64,
``MonaOp`` = depthwise 3x3, 5x5 and 7x7 convolutions on the patch grid, averaged, plus identity, then
``z + conv1x1(z)``; GELU, dropout 0.1, up 64 -> d. Class/register tokens (absent from the Swin
backbones of the paper) run through ``MonaOp`` as separate 1x1 images, i.e. only the kernel centres
act on them (:mod:`vpeft.layers.token_grid`).

Placement (official ``SwinBlock.forward``): one Mona after the attention residual and one after the
MLP residual -- ``h = mona1(x + attn(LN1 x))``, ``out = mona2(h + mlp(LN2 h))``. With wrappers: the
block is wrapped (:class:`MonaBlock`, owns mona2) and so is its ``norm2`` (:class:`MonaNormTap`, owns
mona1): the tap sees exactly ``h`` = the stream after the attention residual, adds mona1's update
before ``norm2`` and hands the same update to the block wrapper, which adds it to the block output --
so the MLP residual also carries ``mona1(h)``, as in the paper. LayerScale/drop-path of the backbone
never touch the Mona updates.

Initialisation as the official code: every linear/conv layer keeps PyTorch's default init (no zero
up-projection), ``gamma = 1e-6``, ``gammax = 1``; Mona is therefore *not* the identity at init.

ViT-B/16, dim 64: per Mona LN 2*768 + gamma 768 + gammax 768 + down 768*64 + 64 + convs
64*(9+25+49) + 3*64 + 1x1 64*64 + 64 + up 64*768 + 768 = 111,872; two per block:
12 * 2 * 111,872 = 2,684,928 parameters. (The paper reports counts for Swin backbones only.)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..arch import ArchSpec, Target, patch_grid
from ..config import MethodConfig, check_float, check_int
from ..layers.base import Wrapper
from ..layers.token_grid import Grid, map_on_grid
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["MonaConfig", "Mona", "MonaAdapter", "MonaBlock", "MonaNormTap"]


class MultiScaleConv(nn.Module):
    """Official ``MonaOp``: mean of depthwise 3/5/7 convolutions plus identity, then ``z + conv1x1(z)``."""

    def __init__(self, channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, **kw)
        self.conv2 = nn.Conv2d(channels, channels, 5, padding=2, groups=channels, **kw)
        self.conv3 = nn.Conv2d(channels, channels, 7, padding=3, groups=channels, **kw)
        self.projector = nn.Conv2d(channels, channels, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.conv1(x) + self.conv2(x) + self.conv3(x)) / 3.0 + x
        return z + self.projector(z)


class MonaAdapter(nn.Module):
    """The Mona update ``up(dropout(GELU(MonaOp(down(LN(x) * gamma + x * gammax)))))`` (without the identity)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_prefix: int,
        grid: Grid | None,
        dropout: float = 0.1,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.num_prefix, self.grid = num_prefix, grid
        self.norm = nn.LayerNorm(dim, **kw)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6, **kw))
        self.gammax = nn.Parameter(torch.ones(dim, **kw))
        self.project1 = nn.Linear(dim, hidden, **kw)
        self.adapter_conv = MultiScaleConv(hidden, **kw)
        self.dropout = nn.Dropout(dropout)
        self.project2 = nn.Linear(hidden, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project1(self.norm(x) * self.gamma + x * self.gammax)
        h = map_on_grid(self.adapter_conv, h, self.num_prefix, self.grid)
        return self.project2(self.dropout(F.gelu(h)))


class _Carry:
    """Hands mona1's update from the ``norm2`` tap to the block wrapper within one block call (not a module)."""

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None


class MonaNormTap(Wrapper):
    """Wraps a block's ``norm2``: ``h -> norm2(mona1(h))``, passing mona1's update on to :class:`MonaBlock`."""

    def __init__(self, base_layer: nn.Module, adapter: MonaAdapter, carry: _Carry) -> None:
        super().__init__(base_layer)
        self.adapter = adapter
        self.carry = carry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.adapter(x)
        self.carry.delta = delta
        return self.base_layer(x + delta)


class MonaBlock(Wrapper):
    """Wraps a transformer block: adds mona1's update (from the tap) to the output, then applies mona2."""

    def __init__(self, base_layer: nn.Module, adapter: MonaAdapter, carry: _Carry) -> None:
        super().__init__(base_layer)
        self.adapter = adapter
        self.carry = carry

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.carry.delta = None
        y = self.base_layer(x, *args, **kwargs)
        delta, self.carry.delta = self.carry.delta, None
        if delta is None:
            raise RuntimeError("Mona: the block's norm2 was not called; the backbone block has an unexpected layout")
        y = y + delta
        return y + self.adapter(y)


@dataclasses.dataclass(frozen=True)
class MonaConfig(MethodConfig):
    """Mona.

    Attributes:
        dim: hidden width of the adapter (>= 1); 64 in the paper.
        dropout: dropout before the up-projection, in [0, 1).
    """

    method = "mona"
    dim: int = 64
    dropout: float = 0.1

    def validate(self) -> None:
        check_int(self, "dim", 1)
        check_float(self, "dropout", 0.0, 0.999)


@register_method
class Mona(Method):
    config_cls = MonaConfig
    family = ADDITION
    paper = (
        "Yin et al., 5%>100%: Breaking Performance Shackles of Full Fine-Tuning on Visual Recognition Tasks, CVPR 2025"
    )
    identity_at_init = False
    kinds = ("vit",)

    def _adapter(self, spec: ArchSpec, grid: Grid | None, like: torch.Tensor) -> MonaAdapter:
        cfg = self.config
        return MonaAdapter(
            spec.embed_dim, cfg.dim, spec.num_prefix_tokens, grid, cfg.dropout, device=like.device, dtype=like.dtype
        )

    roles = ("norm2", "block")  # the tap after the pre-MLP norm and the block (canonical order: norm2 first)

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        like = next(model.get_submodule(target.block).parameters())
        adapter = self._adapter(spec, patch_grid(spec), like)
        if target.role == "norm2":
            self._carry = _Carry()  # what the norm tap hands to this block's wrapper
            return MonaNormTap(target.module, adapter, self._carry)
        return MonaBlock(target.module, adapter, self._carry)
