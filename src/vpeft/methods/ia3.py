"""IA3: learned vectors rescaling the keys, the values and the FFN's hidden activation.

Reference: Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", NeurIPS 2022 ((IA)^3, Sec. 3.3): ``softmax(Q (l_k * K)^T) (l_v * V)`` in
every attention layer and ``(l_ff * gamma(W_1 x)) W_2`` in every position-wise FFN; all vectors
initialised to ones, so the model starts as the frozen backbone.

Placement in vpeft: ``l_k`` and ``l_v`` multiply the k and v output slices of timm's fused ``qkv``
(q untouched), or the separate k and v projections of Hugging Face models; ``l_ff`` multiplies the input
of ``fc2`` -- the FFN hidden after the non-linearity (after timm's optional ``mlp.norm`` when a backbone
has one). Both fold into the weights: the k/v
rows (and biases) of ``qkv`` and the columns of ``fc2``.
ViT-B/16: 12 * (768 + 768 + 3072) = 55,296 parameters (the paper reports counts for T0, not ViT).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import QKV, ArchSpec, Target
from ..config import MethodConfig, check_subset
from ..layers.scaling import InputScale, OutputScale
from ..registry import register_method
from .base import REPARAMETER, Method

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

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        # the FFN hidden activation is fc2's input
        return tuple("fc2" if t == "ff" else t for t in self.config.targets)

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        if target.role == "fc2":
            return InputScale(target.module)
        return OutputScale(target.module, target.slice_list)
