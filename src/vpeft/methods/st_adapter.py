"""ST-Adapter: a bottleneck with a depthwise 3-D convolution across time, before each block's attention (or MLP).

Reference: Pan et al., "ST-Adapter: Parameter-Efficient Image-to-Video Transfer Learning", NeurIPS 2022; official
code linziyi96/st-adapter (``models_adapter.py``: ``Adapter``, ``ResidualAttentionBlock``).

Module (official ``Adapter.forward``): on the patch tokens of ``B * T`` frames (the class and register tokens pass
unchanged), ``x + fc2(conv3d(fc1(x)))`` with ``fc1`` d -> 384, a depthwise ``Conv3d`` of kernel ``3 x 1 x 1``
(time x height x width, padding 1 in time) on the ``(B, 384, T, h, w)`` patch grid, and ``fc2`` 384 -> d; there is
no activation. Each adapter sits on the residual stream and changes it (official ``ResidualAttentionBlock``)::

    x = adapter_pre_attn(x)            # placement "attn" and "attn_mlp"
    x = x + attn(LN1(x))
    x = adapter_pre_mlp(x)             # placement "mlp" and "attn_mlp": after the attention residual, before LN2
    x = x + mlp(LN2(x))

``placement``: ``"attn"`` (default) is the paper's figure and text, one adapter before each block's attention -- a
wrapper that changes the block's input, on any ViT block; ``"attn_mlp"`` is the paper's Something-Something v2
setting (the official ``clip_vit_base_patch16_adapter24x384``: both adapters, 24 on ViT-B); ``"mlp"`` is what the
official 12-adapter Kinetics-400 model builds (``clip_vit_base_patch16_adapter12x384`` sets
``adapter_pre_attn=False, adapter_pre_mlp=True``), the same count as ``"attn"``. The two placements with a pre-MLP
adapter re-run a timm ViT block from its parts (``norm1``, ``attn``, ``norm2``, ``mlp``, keeping its ``ls1`` /
``drop_path1`` / ``ls2`` / ``drop_path2``) and refuse other blocks. Initialisation as the official code, in every
adapter: the convolution's weight and bias zero (so each adapter is the identity at init), ``fc1`` / ``fc2``
PyTorch's default weights with zero biases. On a backbone pooled from its class token, the last block's pre-MLP
adapter cannot reach the output (it changes patch tokens after the last attention; the official model reads the class
token and trains it all the same): its gradient is exactly zero, as tests/test_video.py checks.

ViT-B/16 (any number of frames), bottleneck 384: per adapter 768*384 + 384 + 384*3 + 384 + 384*768 + 768 = 592,512;
12 blocks: 7,110,144 (the paper's 7.1M, ``"attn"`` or ``"mlp"``); ``"attn_mlp"``, 24 adapters: 14,220,288 (the
paper's 14.2M).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..arch import ArchSpec, Target, patch_grid
from ..config import MethodConfig, check_choice, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.base import Wrapper, input_of
from ..layers.temporal import TemporalModule, num_frames_of
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["PLACEMENTS", "STAdapter", "STAdapterBlock", "STAdapterConfig", "STAdapterModule"]


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
    """A block with ST-Adapter updates on its patch tokens: ``adapter`` on the block's input (before attention),
    ``mlp_adapter`` on the residual stream between the attention and the MLP (see the module docstring); either
    may be ``None``."""

    def __init__(
        self,
        block: nn.Module,
        adapter: STAdapterModule | None,
        prefix: int,
        grid: tuple[int, int] | None,
        mlp_adapter: STAdapterModule | None = None,
    ) -> None:
        super().__init__(block)
        self.adapter, self.mlp_adapter, self.prefix, self.grid = adapter, mlp_adapter, prefix, grid

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"ST-Adapter: {n} patch tokens are neither the built {self.grid} grid nor a square one")
        return side, side

    def _adapt(self, adapter: STAdapterModule, x: torch.Tensor) -> torch.Tensor:
        """``x`` with ``adapter``'s update added to its patch tokens (the residual of the official adapter)."""
        bt, n, d = x.shape
        t = self.frames(bt)
        h, w = self._grid(n - self.prefix)
        patches = x[:, self.prefix :].reshape(bt // t, t, h, w, d)
        update = adapter(patches).reshape(bt, h * w, d)
        return torch.cat([x[:, : self.prefix], x[:, self.prefix :] + update], dim=1)

    def forward(self, *args, **kwargs):
        x = input_of(self, args, kwargs)
        if self.adapter is not None:
            x = self._adapt(self.adapter, x)
        if self.mlp_adapter is not None:
            rest = args[1:] if args else ()
            extra = kwargs if args else dict(list(kwargs.items())[1:])
            return self._parts_forward(x, rest, extra)
        if args:
            return self.base_layer(x, *args[1:], **kwargs)
        first = next(iter(kwargs))
        return self.base_layer(**{**kwargs, first: x})

    def _parts_forward(self, x: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
        """The timm block's own steps, with the pre-MLP adapter on the stream after the attention residual."""
        b = self.base_layer
        ls1, dp1 = getattr(b, "ls1", nn.Identity()), getattr(b, "drop_path1", nn.Identity())
        ls2, dp2 = getattr(b, "ls2", nn.Identity()), getattr(b, "drop_path2", nn.Identity())
        x = x + dp1(ls1(b.attn(b.norm1(x), *rest, **kwargs)))
        x = self._adapt(self.mlp_adapter, x)
        return x + dp2(ls2(b.mlp(b.norm2(x))))


#: where the adapters go: before the attention, before the MLP, or both (see the module docstring)
PLACEMENTS = ("attn", "mlp", "attn_mlp")
_PARTS = ("norm1", "attn", "norm2", "mlp")


@dataclasses.dataclass(frozen=True)
class STAdapterConfig(MethodConfig):
    """ST-Adapter.

    Attributes:
        bottleneck: the adapter width (384 on ViT-B/16, the paper's default).
        kernel_t: the temporal kernel size of the depthwise convolution (odd; 3).
        placement: ``attn`` (one adapter before each block's attention, the paper's figure and Kinetics-400
            count), ``mlp`` (one before each MLP, the official Kinetics-400 code) or ``attn_mlp`` (both, the
            paper's Something-Something v2 setting).
    """

    method = "st_adapter"
    bottleneck: int = 384
    kernel_t: int = 3
    placement: str = "attn"

    def validate(self) -> None:
        check_int(self, "bottleneck", 1)
        check_int(self, "kernel_t", 1)
        check_choice(self, "placement", PLACEMENTS)
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

    def check_targets(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        if self.config.placement == "attn":
            return
        for target in targets:
            missing = [p for p in _PARTS if not isinstance(getattr(target.module, p, None), nn.Module)]
            if missing:
                raise UnsupportedBackboneError(
                    f"method 'st_adapter' with placement={self.config.placement!r} re-runs timm ViT blocks from "
                    f"their parts (norm1, attn, norm2, mlp) to reach the stream before the MLP; block "
                    f"{target.name} of {spec.arch} lacks {', '.join(missing)} (placement='attn' adapts any block)"
                )

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        like = next(target.module.parameters())
        cfg = self.config

        def adapter(where: str) -> STAdapterModule | None:
            if where not in cfg.placement.split("_"):
                return None
            kernel = (cfg.kernel_t, 1, 1)
            return STAdapterModule(spec.embed_dim, cfg.bottleneck, kernel, device=like.device, dtype=like.dtype)

        grid = patch_grid(spec)
        block = STAdapterBlock(target.module, adapter("attn"), spec.num_prefix_tokens, grid, adapter("mlp"))
        block.num_frames = num_frames_of(model)
        return block
