"""LoRA: low-rank updates ``dW = (alpha / r) B A`` of chosen projections.

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
Placement (paper default, also the standard VTAB-1k tables): W_q and W_v of every attention
layer, rank 8. timm fuses q, k and v into one ``qkv`` linear; vpeft adapts the q and v output
slices of it only (k untouched), which is exactly LoRA on separate q and v projections.
Backbones with separate q/k/v Linears (Hugging Face ViT/CLIP) get LoRA on those modules directly.
Initialisation: A Kaiming-uniform, B zero (identity at init). alpha = r gives scale 1.
ViT-B/16, r = 8 on q, v: 12 blocks * 2 * (8 * 768 + 768 * 8) = 294,912 parameters.

CNNs (no paper default; the targets must be chosen): ``pw`` adapts every pointwise channel mixer outside
the head -- 1x1 convolutions with ``groups=1`` and Linear layers on channels-last maps (ConvNeXt's MLP) --
and ``kxk`` every k x k (k > 1) convolution with ``groups=1`` (stems, downsampling, full convs). Convs get
:class:`~vpeft.layers.lora_conv.LoRAConv2d` (A: k x k conv to r channels, B: 1x1 conv, mergeable);
depthwise and grouped convolutions are skipped.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import QKV, ArchSpec, Target
from ..config import MethodConfig, check_float, check_int, check_subset
from ..errors import UnsupportedBackboneError
from ..layers import LoRALinear
from ..layers.lora import share_inputs
from ..layers.lora_conv import LoRAConv2d
from ..registry import register_method
from .base import REPARAMETER, Method

VIT_TARGETS = (*QKV, "proj", "fc1", "fc2")
CNN_TARGETS = ("pw", "kxk")
TARGETS = VIT_TARGETS + CNN_TARGETS


@dataclasses.dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """LoRA.

    Attributes:
        r: rank (>= 1).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch input, in [0, 1).
        targets: projections to adapt in every block of a transformer: any of q, k, v (slices of a fused
            qkv, or separate q/k/v Linears), proj, fc1, fc2 (``"qkv"`` is shorthand for q, k, v); on CNNs
            ``pw`` (1x1 convs and channel Linears) and/or ``kxk`` (k x k convs), see the module docstring.
    """

    method = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        expanded = tuple(t for name in targets for t in (QKV if name == "qkv" else (name,)))
        object.__setattr__(self, "targets", expanded)
        super().__post_init__()

    def validate(self) -> None:
        check_int(self, "r", 1)
        check_float(self, "alpha", 0.0, low_open=True)
        check_float(self, "dropout", 0.0, 0.999)
        check_subset(self, "targets", TARGETS)


@register_method
class LoRA(Method):
    config_cls = LoRAConfig
    family = REPARAMETER
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022"
    mergeable = True
    kinds = ("vit", "swin", "cnn")

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        return self.config.targets

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        if spec.kind == "cnn" and not self.targets(model, spec):
            targets = list(self.config.targets)
            raise UnsupportedBackboneError(f"lora: {spec.arch} has no groups=1 layers for targets {targets}")

    def finish(self, model: nn.Module, spec: ArchSpec, adapted: list[str]) -> list[str]:
        """The LayerNorm / GELU outputs the wrapped Linears read are tagged: the fused layers save the input those
        modules' backward keeps anyway and recompute their output in backward (:func:`share_inputs`)."""
        if any(isinstance(model.get_submodule(name), LoRALinear) for name in adapted):
            share_inputs(model)
        return adapted

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        base, cfg = target.module, self.config  # a Linear (every transformer role, channel Linears) or a Conv2d
        if isinstance(base, nn.Conv2d):
            return LoRAConv2d(base, cfg.r, cfg.alpha, cfg.dropout)
        return LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, target.slice_list)
