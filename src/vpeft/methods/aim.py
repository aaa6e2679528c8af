"""AIM: spatial, temporal and joint adapters that turn a frozen image ViT into a video model.

Reference: Yang et al., "AIM: Adapting Image Models for Efficient Video Action Recognition", ICLR 2023; official
code taoyang1122/adapt-image-models (``mmaction/models/backbones/vit_clip.py``: ``ResidualAttentionBlock``).

Block (official ``forward``, tokens of ``B * T`` frames)::

    x = x + T_Adapter(attn(LN1(x along time)))     # temporal: the frozen attention over the T frames of each token
    x = x + S_Adapter(attn(LN1(x)))                # spatial: the frozen attention over each frame's tokens
    x = x + mlp(LN2(x)) + s * MLP_Adapter(LN2(x))  # joint: a branch parallel to the MLP, s = 0.5

The temporal step re-uses the frozen self-attention weights on sequences of ``T`` tokens (one per frame at the same
position), so temporal modelling adds no attention weights. Each adapter is ``fc2(GELU(fc1(x)))`` with bottleneck
``d / 4`` (192 on ViT-B); the spatial one adds its input (``skip_connect=True``), the temporal and joint ones do not.
A learned temporal embedding ``(T, d)`` (zeros) is added to every token before the first block. Initialisation as
the official code: ``fc2`` weight and bias zero in all three adapters (so the model is the frozen image model run
frame-wise at init), ``fc1`` timm's default init of a Linear (the official ``trunc_normal_(std=0.02)``, bias 0).
On backbones with LayerScale / drop-path (DINOv2), the attention branches keep the block's ``ls1`` / ``drop_path1``
and the MLP keeps ``ls2`` / ``drop_path2``; the joint adapter is added outside them, as in the official block.

ViT-B/16, 8 frames: per adapter 768*192 + 192 + 192*768 + 768 = 295,872; three per block, 12 blocks: 10,651,392;
plus the temporal embedding 8*768 = 6,144: 10,657,536 (the paper's "11M" includes the 400-class head of K400,
768*400 + 400 = 307,600, making 10.97M).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..arch import ArchSpec, Target
from ..config import MethodConfig, check_float, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.base import Wrapper
from ..layers.temporal import TemporalModule, num_frames_of
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["AIM", "AIMAdapter", "AIMBlock", "AIMConfig"]


class AIMAdapter(nn.Module):
    """``x + fc2(GELU(fc1(x)))`` (``skip=True``) or ``fc2(GELU(fc1(x)))``; ``fc2`` starts at zero."""

    def __init__(self, width: int, bottleneck: int, skip: bool, *, device=None, dtype=None) -> None:
        super().__init__()
        self.skip = skip
        self.fc1 = nn.Linear(width, bottleneck, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(bottleneck, width, device=device, dtype=dtype)
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(x)))
        return x + out if self.skip else out


_PARTS = ("norm1", "attn", "norm2", "mlp")


class AIMBlock(Wrapper, TemporalModule):
    """A timm ViT block run as AIM's (see the module docstring); the first block also adds the temporal embedding."""

    def __init__(
        self, block: nn.Module, width: int, bottleneck: int, scale: float, num_frames: int | None, like: torch.Tensor
    ) -> None:
        super().__init__(block)
        kw = {"device": like.device, "dtype": like.dtype}
        self.scale = scale
        self.t_adapter = AIMAdapter(width, bottleneck, skip=False, **kw)
        self.s_adapter = AIMAdapter(width, bottleneck, skip=True, **kw)
        self.mlp_adapter = AIMAdapter(width, bottleneck, skip=False, **kw)
        self.temporal_embedding = nn.Parameter(torch.zeros(num_frames, width, **kw)) if num_frames else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        b = self.base_layer
        bt, n, d = x.shape
        t = self.frames(bt)
        if self.temporal_embedding is not None:
            if self.temporal_embedding.shape[0] != t:
                raise ConfigError(
                    f"AIM's temporal embedding is for {self.temporal_embedding.shape[0]} frames; the clips have {t}"
                )
            x = (x.reshape(bt // t, t, n, d) + self.temporal_embedding[None, :, None]).reshape(bt, n, d)
        ls1, dp1 = getattr(b, "ls1", nn.Identity()), getattr(b, "drop_path1", nn.Identity())
        ls2, dp2 = getattr(b, "ls2", nn.Identity()), getattr(b, "drop_path2", nn.Identity())
        # temporal: each token position attends over the clip's frames with the frozen attention
        xt = x.reshape(bt // t, t, n, d).transpose(1, 2).reshape(bt // t * n, t, d)
        xt = self.t_adapter(b.attn(b.norm1(xt)))
        xt = xt.reshape(bt // t, n, t, d).transpose(1, 2).reshape(bt, n, d)
        x = x + dp1(ls1(xt))
        # spatial: the frozen attention over each frame, its output through the spatial adapter
        x = x + dp1(ls1(self.s_adapter(b.attn(b.norm1(x), *args, **kwargs))))
        # joint: the MLP and a scaled parallel adapter
        h = b.norm2(x)
        return x + dp2(ls2(b.mlp(h))) + self.scale * self.mlp_adapter(h)


@dataclasses.dataclass(frozen=True)
class AIMConfig(MethodConfig):
    """AIM.

    Attributes:
        bottleneck: hidden width of each adapter; 0 (default): a quarter of the width (``mlp_ratio=0.25``, 192 on
            ViT-B).
        scale: multiplier of the joint (MLP) adapter (the official ``adapter_scale``, 0.5).
        temporal_embedding: learn AIM's temporal embedding added before the first block.
    """

    method = "aim"
    bottleneck: int = 0
    scale: float = 0.5
    temporal_embedding: bool = True

    def validate(self) -> None:
        check_int(self, "bottleneck", 0)
        check_float(self, "scale", 0.0, low_open=True)
        if not isinstance(self.temporal_embedding, bool):
            raise ConfigError(f"aim: temporal_embedding={self.temporal_embedding!r} must be true or false")


@register_method
class AIM(Method):
    config_cls = AIMConfig
    family = ADDITION
    title = "AIM"
    paper = "Yang et al., AIM: Adapting Image Models for Efficient Video Action Recognition, ICLR 2023"
    kinds = ("vit",)
    inputs = ("video",)
    roles = ("block",)

    def check_targets(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        for target in targets:
            missing = [p for p in _PARTS if not isinstance(getattr(target.module, p, None), nn.Module)]
            if missing or spec.attention != "fused":
                raise UnsupportedBackboneError(
                    f"method 'aim' re-runs the frozen attention along time inside timm ViT blocks "
                    f"(norm1, attn, norm2, mlp); block {target.name} of {spec.arch} is not one"
                )

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        like = next(target.module.parameters())
        width = spec.embed_dim
        bottleneck = self.config.bottleneck or width // 4
        frames = num_frames_of(model) if target.index == 0 and self.config.temporal_embedding else None
        block = AIMBlock(target.module, width, bottleneck, self.config.scale, frames, like)
        block.num_frames = num_frames_of(model)
        return block
