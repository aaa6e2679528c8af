"""IA3: learned vectors rescaling the keys, the values and the FFN's hidden activation.

Reference: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", NeurIPS 2022 ((IA)^3, Sec. 3.3): ``softmax(Q (l_k * K)^T) (l_v * V)`` in
every attention layer and ``(l_ff * gamma(W_1 x)) W_2`` in every position-wise FFN; all vectors
initialised to ones, so the model starts as the frozen backbone.

Placement in vpeft: ``l_k`` and ``l_v`` multiply the k and v output slices of timm's fused ``qkv``
(q untouched); ``l_ff`` multiplies the input of ``fc2`` -- the FFN hidden after the non-linearity
(after timm's optional ``mlp.norm`` when a backbone has one). Both fold into the weights: the k/v
rows (and biases) of ``qkv`` and the columns of ``fc2``.
ViT-B/16: 12 * (768 + 768 + 3072) = 55,296 parameters (the paper reports counts for T0, not ViT).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import get_module, set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_subset
from ..errors import UnsupportedBackboneError
from ..layers.scaling import InputScale, OutputScale
from ..registry import register_method
from .base import REPARAMETER, Method

QKV = ("q", "k", "v")
TARGETS = (*QKV, "ff")


@dataclasses.dataclass(frozen=True)
class IA3Config(MethodConfig):
    """IA3.

    Attributes:
        targets: what to rescale in every block: ``k`` and ``v`` (slices of the fused qkv output),
            ``ff`` (the FFN hidden activation, i.e. fc2's input); ``q`` is also accepted.
    """

    method = "ia3"
    targets: tuple[str, ...] = ("k", "v", "ff")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        super().__post_init__()

    def validate(self) -> None:
        check_subset(self, "targets", TARGETS)


def _linear(model: nn.Module, name: str, what: str, block: str) -> nn.Linear:
    base = get_module(model, name) if name else None
    if not isinstance(base, nn.Linear):
        raise UnsupportedBackboneError(f"ia3: block {block} has no {what} Linear layer")
    return base


@register_method
class IA3(Method):
    config_cls = IA3Config
    family = REPARAMETER
    paper = (
        "Liu et al., Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning, "
        "NeurIPS 2022"
    )
    mergeable = True
    kinds = ("vit", "swin")

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        targets, adapted = self.config.targets, []
        qkv_index = [i for i, t in enumerate(QKV) if t in targets]
        for parts in spec.parts:
            separate = [getattr(parts, QKV[i]) for i in qkv_index]
            if qkv_index and not parts.qkv and all(separate):  # separate q/k/v Linears (Hugging Face)
                for t, name in zip((QKV[i] for i in qkv_index), separate):
                    set_module(model, name, OutputScale(_linear(model, name, t, parts.block)))
                adapted += separate
            elif qkv_index:
                qkv = _linear(model, parts.qkv, "fused qkv", parts.block)
                width = qkv.out_features // 3
                set_module(model, parts.qkv, OutputScale(qkv, [(i * width, (i + 1) * width) for i in qkv_index]))
                adapted.append(parts.qkv)
            if "ff" in targets:
                set_module(model, parts.fc2, InputScale(_linear(model, parts.fc2, "fc2", parts.block)))
                adapted.append(parts.fc2)
        return adapted
