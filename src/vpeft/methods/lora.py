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

from .._modules import get_module, set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_float, check_int, check_subset
from ..errors import UnsupportedBackboneError
from ..layers import LoRALinear, Wrapper
from ..layers.lora_conv import LoRAConv2d
from ..registry import register_method
from .base import REPARAMETER, Method

QKV = ("q", "k", "v")
VIT_TARGETS = (*QKV, "proj", "fc1", "fc2")
CNN_TARGETS = ("pw", "kxk")
TARGETS = VIT_TARGETS + CNN_TARGETS


def _in_head(name: str, head: str) -> bool:
    return bool(head) and (name == head or name.startswith(head + "."))


def conv_targets(model: nn.Module, spec: ArchSpec, target: str) -> list[str]:
    """Modules a CNN target names: ``pw`` (1x1 groups=1 convs, channel Linears), ``kxk`` (k > 1, groups=1)."""
    names = []
    for name, m in model.named_modules():
        if _in_head(name, spec.head) or isinstance(m, Wrapper):
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            pointwise = tuple(m.kernel_size) == (1, 1)
            if pointwise == (target == "pw"):
                names.append(name)
        elif isinstance(m, nn.Linear) and target == "pw":
            names.append(name)
    return names


def lora_target_modules(model: nn.Module, spec: ArchSpec) -> dict[str, list[str]]:
    """Every LoRA target of this backbone -> the modules it adapts (a fused q/k/v projection: key ``"qkv"``)."""
    if spec.kind == "cnn":
        return {t: conv_targets(model, spec, t) for t in CNN_TARGETS}
    roles: dict[str, list[str]] = {}
    for parts in spec.parts:
        for t in ("qkv", *VIT_TARGETS):
            name = getattr(parts, t, "")
            if name:
                roles.setdefault(t, []).append(name)
    return roles


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

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        allowed = CNN_TARGETS if spec.kind == "cnn" else VIT_TARGETS
        wrong = [t for t in self.config.targets if t not in allowed]
        if wrong:
            hint = " (pw: 1x1 convs and channel Linears, kxk: k x k convs)" if spec.kind == "cnn" else ""
            raise UnsupportedBackboneError(
                f"lora: targets {wrong} do not exist on {spec.family} ({spec.kind}) backbones; "
                f"use targets from {list(allowed)} there{hint}"
            )
        if spec.kind == "cnn" and not any(conv_targets(model, spec, t) for t in self.config.targets):
            targets = list(self.config.targets)
            raise UnsupportedBackboneError(f"lora: {spec.family} has no groups=1 layers for targets {targets}")

    def _wrap(self, model: nn.Module, name: str, slices: list[tuple[int, int]] | None) -> None:
        base = get_module(model, name)
        cfg = self.config
        if isinstance(base, nn.Conv2d) and slices is None:
            set_module(model, name, LoRAConv2d(base, cfg.r, cfg.alpha, cfg.dropout))
            return
        if not isinstance(base, nn.Linear):
            raise UnsupportedBackboneError(f"lora: {name} is a {type(base).__name__}, not a Linear layer")
        set_module(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, slices))

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        targets, adapted = self.config.targets, []
        if spec.kind == "cnn":
            names = [n for t in CNN_TARGETS if t in targets for n in conv_targets(model, spec, t)]
            for name in names:
                self._wrap(model, name, None)
            return names
        for parts in spec.parts:
            wanted = [t for t in QKV if t in targets]
            if wanted and parts.qkv:
                width = get_module(model, parts.qkv).out_features // 3
                self._wrap(model, parts.qkv, [(QKV.index(t) * width, (QKV.index(t) + 1) * width) for t in wanted])
                adapted.append(parts.qkv)
            elif wanted:
                separate = [getattr(parts, t, "") for t in wanted]
                if not all(separate):
                    raise UnsupportedBackboneError(f"lora: block {parts.block} has no fused qkv or separate q/k/v")
                for name in separate:
                    self._wrap(model, name, None)
                adapted += separate
            for t in ("proj", "fc1", "fc2"):
                if t in targets:
                    name = getattr(parts, t)
                    if not name:
                        raise UnsupportedBackboneError(f"lora: block {parts.block} has no {t} projection")
                    self._wrap(model, name, None)
                    adapted.append(name)
        return adapted
