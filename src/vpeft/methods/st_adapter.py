"""ST-Adapter: a bottleneck with a depthwise 3-D convolution across time, before each block's attention.

Reference: Pan et al., "ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning", NeurIPS 2022; official
code linziyi96/st-adapter (``models_adapter.py``: ``Adapter``, ``ResidualAttentionBlock``).

Module (official ``Adapter.forward``): on the patch tokens of ``B * T`` frames (the class and register tokens pass
unchanged), ``x + fc2(conv3d(fc1(x)))`` with ``fc1`` d -> 384, a depthwise ``Conv3d`` of kernel ``3 x 1 x 1``
(time x height x width, padding 1 in time) on the ``(B, 384, T, h, w)`` patch grid, and ``fc2`` 384 -> d; there is
no activation. Placement (the Kinetics-400 setting, ``adapter_pre_attn=True``): one adapter on the residual stream
at the start of every block, before the attention (``x = adapter(x); x = x + attn(LN1(x)); ...``), i.e. a wrapper
of the block that changes its input. Initialisation as the official code: the convolution's weight and bias zero
(so the adapter is the identity at init), ``fc1`` / ``fc2`` PyTorch's default weights with zero biases.

ViT-B/16 (any number of frames), bottleneck 384: per adapter 768*384 + 384 + 384*3 + 384 + 384*768 + 768 = 592,512;
12 blocks: 7,110,144 (the paper's 7.1M). The SSv2 setting adds a second adapter before each MLP (14,220,288,
the paper's 14.2M); vpeft implements the pre-attention placement only.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..arch import ArchSpec, Target, patch_grid
from ..config import MethodConfig, check_int
from ..errors import ConfigError
from ..layers.base import Wrapper, input_of
from ..layers.temporal import TemporalModule, num_frames_of
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["STAdapter", "STAdapterBlock", "STAdapterConfig", "STAdapterModule"]


class STAdapterModule(nn.Module):
    """``fc2(depthwise conv3d(fc1(x)))`` on ``(B, T, h, w, d)`` patch tokens (the update, without the residual)."""

    def __init__(self, width: int, bottleneck: int, kernel: tuple[int, int, int], *, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(width, bottleneck, **kw)
        self.conv = nn.Conv3d(
            bottleneck, bottleneck, kernel, padding=tuple(k // 2 for k in kernel), groups=bottleneck, **kw
        )
        self.fc2 = nn.Linear(bottleneck, width, **kw)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        h = self.fc1(patches).permute(0, 4, 1, 2, 3)  # (B, C, T, h, w)
        return self.fc2(self.conv(h).permute(0, 2, 3, 4, 1))


class STAdapterBlock(Wrapper, TemporalModule):
    """A block whose input first gets the ST-Adapter update on its patch tokens."""

    def __init__(self, block: nn.Module, adapter: STAdapterModule, prefix: int, grid: tuple[int, int] | None) -> None:
        super().__init__(block)
        self.adapter, self.prefix, self.grid = adapter, prefix, grid

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"ST-Adapter: {n} patch tokens are neither the built {self.grid} grid nor a square one")
        return side, side

    def forward(self, *args, **kwargs):
        x = input_of(self, args, kwargs)
        bt, n, d = x.shape
        t = self.frames(bt)
        h, w = self._grid(n - self.prefix)
        patches = x[:, self.prefix :].reshape(bt // t, t, h, w, d)
        update = self.adapter(patches).reshape(bt, h * w, d)
        x = torch.cat([x[:, : self.prefix], x[:, self.prefix :] + update], dim=1)
        if args:
            return self.base_layer(x, *args[1:], **kwargs)
        first = next(iter(kwargs))
        return self.base_layer(**{**kwargs, first: x})


@dataclasses.dataclass(frozen=True)
class STAdapterConfig(MethodConfig):
    """ST-Adapter.

    Attributes:
        bottleneck: the adapter width (384 on ViT-B/16, the paper's default).
        kernel_t: the temporal kernel size of the depthwise convolution (odd; 3).
    """

    method = "st_adapter"
    bottleneck: int = 384
    kernel_t: int = 3

    def validate(self) -> None:
        check_int(self, "bottleneck", 1)
        check_int(self, "kernel_t", 1)
        if self.kernel_t % 2 == 0:
            raise ConfigError(f"st_adapter: kernel_t={self.kernel_t} must be odd (a centred temporal kernel)")


@register_method
class STAdapter(Method):
    config_cls = STAdapterConfig
    family = ADDITION
    title = "ST-Adapter"
    paper = "Pan et al., ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning, NeurIPS 2022"
    kinds = ("vit",)
    inputs = ("video",)
    roles = ("block",)

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        like = next(target.module.parameters())
        adapter = STAdapterModule(
            spec.embed_dim,
            self.config.bottleneck,
            (self.config.kernel_t, 1, 1),
            device=like.device,
            dtype=like.dtype,
        )
        block = STAdapterBlock(target.module, adapter, spec.num_prefix_tokens, patch_grid(spec))
        block.num_frames = num_frames_of(model)
        return block
