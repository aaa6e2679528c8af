"""Ladder side tuning (LST): a light side network reads the frozen backbone; nothing backpropagates through it.

References: Sung, Cho & Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer
Learning", NeurIPS 2022 (official code ylsung/Ladder-Side-Tuning, ``T5Stack`` of
``modeling_side_t5.py``); Zhang et al., "Side-Tuning", ECCV 2020.

Side network (as the official code, on a ViT): width ``d_s = d / r`` (reduction factor r = 8), one
small transformer block per backbone block (timm ``Block`` with the backbone's head count and MLP
ratio, i.e. head dim and MLP width also divided by r). Its input is a learned down-projection of the
backbone's token embeddings (``side_first_downsample``); before side block i the ladder connection
mixes in backbone block i's output: ``s = g_i * s + (1 - g_i) * down_i(h_i)``, ``g_i = sigmoid(alpha_i / T)``
with ``alpha_i`` learned (init 0) and T = 0.1. The side output goes through the side network's own
final LayerNorm and a learned up-projection ``d_s -> d``; these tokens replace the backbone's final
features, so pooling and the head see only the side network (the backbone's final norm is bypassed).

Memory: every backbone block runs under ``torch.no_grad()`` and the side network reads detached
features, so no backbone activation is kept for backward; the only saved backbone-width tensors are
the block outputs the ladder projections read (needed for their weight gradients).

Design with wrappers: :class:`SideTap` wraps each block (runs it without autograd and records its
input -- for block 0 -- and output); :class:`SideOutput` wraps the ViT's final token norm (the ArchSpec's
``final_norm``: timm's ``norm``, an Identity on ``global_pool="avg"`` models, whose ``fc_norm`` then still acts on the
pooled side features) and owns the whole side network, which it runs on the recorded features. The
taps and the output share a plain per-forward record (not a module, never in ``state_dict``).

Not implemented: initialising the side network from the pruned backbone (LST's Fisher-information
structural pruning needs task data); side blocks and projections start like a fresh timm ViT
(trunc-normal 0.02 weights, zero biases).

ViT-B/16, r = 8 (d_s = 96, 12 heads of 8, MLP 384): first down-projection 768*96 + 96 = 73,824; 12 ladder
projections 12 * 73,824 = 885,888; 12 gates; 12 side blocks 12 * (2*192 + 96*288 + 288 + 96*96 + 96 +
96*384 + 384 + 384*96 + 96) = 12 * 111,840 = 1,342,080; side final norm 192; up-projection 96*768 + 768 =
74,496; total 2,376,492 parameters. (LST reports counts for T5/CLIP-T5 only.)
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from .._modules import get_module, set_module
from ..arch import ArchSpec, attention_layout, final_norm
from ..config import MethodConfig, check_float, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.base import Wrapper
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["LSTConfig", "LST", "LadderSideNetwork", "SideTap", "SideOutput"]


class _Record:
    """The backbone features of the current forward pass: the embeddings and each block's output (detached)."""

    def __init__(self) -> None:
        self.embeddings: torch.Tensor | None = None
        self.features: list[torch.Tensor] = []

    def take(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        out = self.embeddings, self.features
        self.embeddings, self.features = None, []
        return out


class SideTap(Wrapper):
    """Runs a frozen block without autograd and records its (detached) output for the side network."""

    def __init__(self, base_layer: nn.Module, index: int, record: _Record) -> None:
        super().__init__(base_layer)
        self.index = index
        self.record = record

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.index == 0:
            self.record.embeddings, self.record.features = x.detach(), []
        with torch.no_grad():
            y = self.base_layer(x, *args, **kwargs)
        self.record.features.append(y.detach())
        return y

    def extra_repr(self) -> str:
        return f"index={self.index}"


def _init_vit_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LadderSideNetwork(nn.Module):
    """The side network: first down-projection, per-block ladder projections and gates, side blocks, norm, up."""

    def __init__(
        self,
        dim: int,
        side_dim: int,
        depth: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        gate_init: float = 0.0,
        temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        kw = {"device": device, "dtype": dtype}
        self.temperature = temperature
        self.first_downsample = nn.Linear(dim, side_dim, **kw)
        self.downsamples = nn.ModuleList(nn.Linear(dim, side_dim, **kw) for _ in range(depth))
        self.gates = nn.Parameter(torch.full((depth,), float(gate_init), **kw))
        norm = partial(nn.LayerNorm, eps=1e-6)
        ratio = mlp_hidden / side_dim + 1e-6  # Block takes int(dim * ratio) hidden units
        self.blocks = nn.ModuleList(
            Block(side_dim, num_heads, mlp_ratio=ratio, qkv_bias=True, norm_layer=norm, **kw) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(side_dim, eps=1e-6, **kw)
        self.upsample = nn.Linear(side_dim, dim, **kw)
        self.apply(_init_vit_linear)

    def forward(self, embeddings: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        side = self.first_downsample(embeddings)
        gates = torch.sigmoid(self.gates / self.temperature)
        for i, (block, down, h) in enumerate(zip(self.blocks, self.downsamples, features)):
            side = block(gates[i] * side + (1 - gates[i]) * down(h))
        return self.upsample(self.norm(side))


class SideOutput(Wrapper):
    """Wraps the final token norm: returns the side network's features (the backbone's final features are unused)."""

    def __init__(self, base_layer: nn.Module, side: LadderSideNetwork, record: _Record) -> None:
        super().__init__(base_layer)
        self.side = side
        self.record = record

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        embeddings, features = self.record.take()
        if embeddings is None or len(features) != len(self.side.blocks):
            raise RuntimeError(
                f"LST: the side network needs the outputs of all {len(self.side.blocks)} backbone blocks of this "
                f"forward pass, got {len(features)}; call the model (or forward_features) on images"
            )
        return self.side(embeddings, features)


@dataclasses.dataclass(frozen=True)
class LSTConfig(MethodConfig):
    """Ladder side tuning.

    Attributes:
        reduction_factor: side width d / r (>= 1; d / r must be >= 1).
        gate_init: initial gate logit alpha (gate = sigmoid(alpha / T)); 0 gives 0.5.
        temperature: gate temperature T (> 0).
    """

    method = "lst"
    reduction_factor: int = 8
    gate_init: float = 0.0
    temperature: float = 0.1

    def validate(self) -> None:
        check_int(self, "reduction_factor", 1)
        check_float(self, "gate_init", -1e6, 1e6)
        check_float(self, "temperature", 0.0, low_open=True)


def _side_heads(num_heads: int, side_dim: int) -> int:
    return max(h for h in range(1, num_heads + 1) if side_dim % h == 0 and num_heads % h == 0)


@register_method
class LST(Method):
    config_cls = LSTConfig
    family = ADDITION
    paper = "Sung et al., LST: Ladder Side-Tuning, NeurIPS 2022; Zhang et al., Side-Tuning, ECCV 2020"
    identity_at_init = False
    kinds = ("vit",)

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        if not final_norm(spec) or not spec.parts or not spec.parts[0].fc1:
            raise UnsupportedBackboneError(
                f"method {self.name!r} needs a ViT whose blocks have an MLP fc1 and whose final norm acts on the whole "
                f"token sequence (the side network's output replaces it); this {spec.arch} backbone has "
                f"final norm {final_norm(spec)!r} and fc1 {spec.parts[0].fc1 if spec.parts else ''!r}"
            )
        attention_layout(model, spec, spec.parts[0])  # the head count
        if spec.embed_dim // self.config.reduction_factor < 1:
            raise ConfigError(
                f"lst: reduction_factor={self.config.reduction_factor} is invalid for width {spec.embed_dim}; "
                f"expected 1..{spec.embed_dim}"
            )

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        cfg, record = self.config, _Record()
        first = spec.parts[0]
        side_dim = spec.embed_dim // cfg.reduction_factor
        heads = _side_heads(attention_layout(model, spec, first).heads, side_dim)
        mlp_hidden = max(1, get_module(model, first.fc1).out_features // cfg.reduction_factor)
        like = next(model.parameters())
        side = LadderSideNetwork(
            spec.embed_dim,
            side_dim,
            spec.depth,
            heads,
            mlp_hidden,
            gate_init=cfg.gate_init,
            temperature=cfg.temperature,
            device=like.device,
            dtype=like.dtype,
        )
        for i, name in enumerate(spec.blocks):
            set_module(model, name, SideTap(get_module(model, name), i, record))
        norm = final_norm(spec)
        set_module(model, norm, SideOutput(get_module(model, norm), side, record))
        return [*spec.blocks, norm]
