"""ZeroI2V: a zero-parameter temporal head shift in the frozen attention, plus linear adapters merged into it.

Reference: Li, Zhu and Wang, "ZeroI2V: Zero-Cost Adaptation of Pre-trained Transformers from Image to Video",
ECCV 2024; official code MCG-NJU/ZeroI2V (``mmaction/models/common/stdha.py``: ``TemporalShift``, ``STDHA``;
``mmaction/models/backbones/vit_zero_clip.py``: ``LinearAdapter``, ``ResidualAttentionBlock_ZeroI2V``;
``tools/weight_reparam.py``: the merge).

**Spatial-temporal dual-headed attention (STDHA).** After the frozen ``qkv`` projection of ``B * T`` frames, the
keys and values of some heads are taken from a neighbouring frame of the same clip: heads ``[0, h)`` read frame
``t - 1``, heads ``[h, 2h)`` frame ``t + 1`` (``h`` = :attr:`ZeroI2VConfig.heads`, 1 by default); the first frame's
``t - 1`` and the last frame's ``t + 1`` heads keep their own frame (the official ``out = feat.clone()``). The
queries stay, so those heads attend from the current frame's tokens to a neighbour's: temporal attention with no
parameters and no extra FLOPs (an index shuffle). The official K400 setting on ViT-B (``shift_div=12``,
``divide_head=False``: ``768 / 12 = 64`` channels per direction) is exactly one 64-wide head each way, which is
``heads=1``. The shift is not the identity, so the adapted model differs from the frozen one at initialisation
(except on 1-frame clips, where there is no neighbour).

**Linear adapters** (official ``LinearAdapter``: ``x + s * fc2(dropout(fc1(x)))``, no activation, bottleneck
``d / 4``, ``s = 0.5``, dropout 0.1, ``fc1`` truncated-normal std 0.02 with zero bias, ``fc2`` zero: each adapter is
the identity at initialisation), four per block (the official ``num_tadapter=2`` K400 block)::

    x = x + S(attn_shifted(T_in(LN1(x))))      # T_in before the qkv projection, S after the output projection
    x = x + MLP_out(mlp(MLP_in(LN2(x))))        # MLP_in before fc1, MLP_out after fc2

Each is affine, so each folds into the frozen Linear next to it (``tools/weight_reparam.py``): before a Linear,
``W' = W M``, ``b' = W c + b``; after one, ``W' = M W``, ``b' = M b + c``, with ``adapter(x) = M x + c``. A learned
temporal embedding ``(T, d)`` (zeros, trained as in the official code) is added to every token before the
pre-norm (timm's ``norm_pre``, the official ``ln_pre``) -- it is a per-frame bias, which no weight can absorb.

**Merging keeps the shift.** :func:`vpeft.merge` folds and removes every :class:`~vpeft.layers.Wrapper`. The
adapters are wrappers (:class:`ZeroI2VAdapterBefore` on ``qkv`` / ``fc1``, :class:`ZeroI2VAdapterAfter` on
``proj`` / ``fc2``); the head shift (:class:`TemporalHeadShift`, around ``qkv`` and its adapter) and the temporal
embedding (:class:`FrameEmbedding`, around ``norm_pre``) are plain modules, part of the adapted architecture, so a
merged model is the frozen ViT with merged weights, the shift and the embedding: ZeroI2V's inference model. A
merged model saved with :func:`vpeft.save_merged` therefore needs these modules to run (a plain timm ViT
loading its weights would lose the shift); the delta file and ``vpeft.load`` are the portable form.

ViT-B/16, 8 frames: per adapter ``768*192 + 192 + 192*768 + 768 = 295,872``; four per block, 12 blocks:
14,201,856 (the paper's "14M" trained parameters; 0 new parameters once merged, up to the embedding); plus the
temporal embedding ``8 * 768 = 6,144``: 14,208,000.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..arch import ArchSpec, Target
from ..config import MethodConfig, check_float, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.base import Wrapper
from ..layers.repadapter import LinearGroupAdapter, RepAdapterLinear
from ..layers.temporal import TemporalModule, num_frames_of
from ..registry import register_method
from .base import REPARAMETER, Method

__all__ = [
    "FrameEmbedding",
    "TemporalHeadShift",
    "ZeroI2V",
    "ZeroI2VAdapterAfter",
    "ZeroI2VAdapterBefore",
    "ZeroI2VConfig",
    "shift_heads",
]


def shift_heads(qkv: torch.Tensor, t: int, width: int, head_dim: int, heads: int) -> torch.Tensor:
    """The STDHA shift on a fused ``(B*T, N, 3*width)`` q/k/v output: in the keys and in the values, heads
    ``[0, heads)`` come from frame ``t - 1`` and heads ``[heads, 2*heads)`` from frame ``t + 1`` of the same clip
    (a clip's first / last frame keeps its own); the queries and the other heads are unchanged."""
    if t == 1:
        return qkv
    bt = qkv.shape[0]
    y = qkv.reshape(bt // t, t, *qkv.shape[1:])
    out = y.clone()
    fold = heads * head_dim
    for start in (width, 2 * width):  # keys, values
        prev, nxt = slice(start, start + fold), slice(start + fold, start + 2 * fold)
        out[:, 1:, ..., prev] = y[:, :-1, ..., prev]
        out[:, :-1, ..., nxt] = y[:, 1:, ..., nxt]
    return out.reshape(qkv.shape)


class TemporalHeadShift(TemporalModule):
    """``shift_heads(layer(x))``: around a block's fused ``qkv`` projection (and the adapter on it). Not a
    :class:`~vpeft.layers.Wrapper` -- it has no weights to fold -- so merging keeps it."""

    def __init__(self, layer: nn.Module, width: int, head_dim: int, heads: int) -> None:
        super().__init__()
        self.layer = layer
        self.width, self.head_dim, self.heads = width, head_dim, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return shift_heads(y, self.frames(y.shape[0]), self.width, self.head_dim, self.heads)

    def extra_repr(self) -> str:
        return f"heads={self.heads} each way, head_dim={self.head_dim}"


class FrameEmbedding(TemporalModule):
    """``norm(x + embedding[t])`` for the tokens of frame ``t``: the temporal embedding before the pre-norm.
    Not a Wrapper (a per-frame bias cannot be folded into weights), so merging keeps it."""

    def __init__(self, norm: nn.Module, num_frames: int, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.embedding = nn.Parameter(torch.zeros(num_frames, width, device=like.device, dtype=like.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bt = x.shape[0]
        t = self.frames(bt)
        if self.embedding.shape[0] != t:
            raise ConfigError(
                f"ZeroI2V's temporal embedding is for {self.embedding.shape[0]} frames; the clips have {t}"
            )
        x = (x.reshape(bt // t, t, *x.shape[1:]) + self.embedding[None, :, None]).reshape(x.shape)
        return self.norm(x)


def _linear_adapter(width: int, cfg: ZeroI2VConfig, like: torch.Tensor) -> LinearGroupAdapter:
    """The official ``LinearAdapter``: ``fc1`` truncated-normal std 0.02 and zero bias, ``fc2`` zero."""
    hidden = cfg.bottleneck or width // 4
    adapter = LinearGroupAdapter(width, hidden, 1, cfg.scale, cfg.dropout, device=like.device, dtype=like.dtype)
    nn.init.trunc_normal_(adapter.down.weight, std=0.02)
    return adapter


class ZeroI2VAdapterBefore(RepAdapterLinear):
    """``layer(adapter(x))``: the linear adapter on the input of ``qkv`` (``T_in``) or ``fc1`` (``MLP_in``);
    merged as ``W' = W M``, ``b' = W c + b``."""

    def __init__(self, base_layer: nn.Linear, adapter: LinearGroupAdapter) -> None:
        super().__init__(base_layer, adapter.hidden, 1, adapter.scale, adapter=adapter)
        self.owns_adapter = True  # its own adapter (RepAdapter's shared-adapter bookkeeping does not apply)


class ZeroI2VAdapterAfter(Wrapper):
    """``adapter(layer(x))``: the linear adapter on the output of ``proj`` (``S``) or ``fc2`` (``MLP_out``);
    merged as ``W' = M W``, ``b' = M b + c``."""

    mergeable = True

    def __init__(self, base_layer: nn.Linear, adapter: LinearGroupAdapter) -> None:
        super().__init__(base_layer)
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))

    @torch.no_grad()
    def merge_into_base(self) -> None:
        base = self.base_layer
        m, c = self.adapter.affine()
        bias = F.linear(base.bias, m) + c if base.bias is not None else c
        base.weight.copy_(m @ base.weight)
        if base.bias is None:
            base.bias = nn.Parameter(bias, requires_grad=False)
        else:
            base.bias.copy_(bias)


@dataclasses.dataclass(frozen=True)
class ZeroI2VConfig(MethodConfig):
    """ZeroI2V.

    Attributes:
        heads: heads per direction whose keys and values come from the previous (the first ``heads``) and the
            next frame (the following ``heads``); 1 (the official ViT-B setting). ``2 * heads`` must not exceed
            the backbone's heads.
        bottleneck: hidden width of each linear adapter; 0 (default): a quarter of the width (192 on ViT-B).
        scale: the adapters' multiplier (the official ``adapter_scale``, 0.5).
        dropout: dropout inside the adapters during training (the official 0.1).
        temporal_embedding: learn the temporal embedding added before the pre-norm (needs timm's ``norm_pre``).
    """

    method = "zeroi2v"
    heads: int = 1
    bottleneck: int = 0
    scale: float = 0.5
    dropout: float = 0.1
    temporal_embedding: bool = True

    def validate(self) -> None:
        check_int(self, "heads", 1)
        check_int(self, "bottleneck", 0)
        check_float(self, "scale", 0.0, low_open=True)
        check_float(self, "dropout", 0.0, 0.999)
        if not isinstance(self.temporal_embedding, bool):
            raise ConfigError(f"zeroi2v: temporal_embedding={self.temporal_embedding!r} must be true or false")


@register_method
class ZeroI2V(Method):
    config_cls = ZeroI2VConfig
    family = REPARAMETER
    title = "ZeroI2V"
    paper = "Li et al., ZeroI2V: Zero-Cost Adaptation of Pre-trained Transformers from Image to Video, ECCV 2024"
    mergeable = True
    identity_at_init = False  # the adapters are; the head shift is not (neighbouring frames' keys and values)
    kinds = ("vit",)
    inputs = ("video",)
    roles = ("qkv", "proj", "fc1", "fc2")

    def _heads(self, model: nn.Module, spec: ArchSpec, target: Target) -> tuple[int, int]:
        attn = model.get_submodule(spec.parts[target.index].attn) if spec.parts[target.index].attn else None
        num_heads = getattr(attn, "num_heads", None)
        if not isinstance(num_heads, int) or spec.embed_dim % num_heads:
            raise UnsupportedBackboneError(
                f"method 'zeroi2v' shifts attention heads; the attention of block {target.index} of {spec.arch} "
                "does not say its num_heads"
            )
        return num_heads, spec.embed_dim // num_heads

    def check_targets(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        if spec.attention != "fused":
            raise UnsupportedBackboneError(
                f"method 'zeroi2v' shifts keys and values inside a fused qkv projection (timm ViTs); "
                f"{spec.arch} has separate q/k/v projections"
            )
        for target in targets:
            if not isinstance(target.module, nn.Linear):
                raise UnsupportedBackboneError(f"method 'zeroi2v' adapts Linear layers; {target.name} is not one")
            if target.role == "qkv":
                num_heads, _ = self._heads(model, spec, target)
                if 2 * self.config.heads > num_heads:
                    raise ConfigError(
                        f"zeroi2v: heads={self.config.heads} shifts {2 * self.config.heads} heads (one way and the "
                        f"other); {target.name} has {num_heads}; use heads <= {num_heads // 2}"
                    )
        if self.config.temporal_embedding and not isinstance(getattr(model, "norm_pre", None), nn.Module):
            raise UnsupportedBackboneError(
                f"method 'zeroi2v' adds its temporal embedding before timm's norm_pre, which {spec.arch} lacks; "
                "pass temporal_embedding=false"
            )

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        like = target.module.weight
        if target.role in ("qkv", "fc1"):
            layer = ZeroI2VAdapterBefore(target.module, _linear_adapter(target.module.in_features, self.config, like))
        else:
            layer = ZeroI2VAdapterAfter(target.module, _linear_adapter(target.module.out_features, self.config, like))
        if target.role != "qkv":
            return layer
        num_heads, head_dim = self._heads(model, spec, target)
        shift = TemporalHeadShift(layer, spec.embed_dim, head_dim, self.config.heads)
        shift.num_frames = num_frames_of(model)
        return shift

    def finish(self, model: nn.Module, spec: ArchSpec, adapted: list[str]) -> list[str]:
        frames = num_frames_of(model)
        if self.config.temporal_embedding and frames is not None:
            embedding = FrameEmbedding(model.norm_pre, frames, spec.embed_dim, next(model.parameters()))
            embedding.num_frames = frames
            model.norm_pre = embedding
            adapted = [*adapted, "norm_pre"]
        return adapted

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        """The temporal embedding (it lives outside the wrappers, so that merging keeps it)."""
        return [f"{n}.embedding" for n, m in model.named_modules() if isinstance(m, FrameEmbedding)]
