"""KronA: Kronecker-product weight updates ``dW = s * (A kron B)`` beside chosen projections.

Reference: Edalati et al., "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022
(arXiv 2212.10650; ENLSP workshop at NeurIPS 2023) -- "a Kronecker equivalent of LoRA": the update
of a frozen ``d_out x d_in`` weight is ``A kron B`` with ``A`` in ``R^{a1 x a2}``, ``B`` in
``R^{(d_out/a1) x (d_in/a2)}``, in parallel to the same projections as LoRA (W_q and W_v), computed
without forming the product (``(A kron B) x = vec(A X B^T)``) and merged into W after training.
KAdaptation (He et al., "Parameter-efficient Model Adaptation for Vision Transformers", AAAI 2023)
generalises this to a sum of Kronecker products with shared "slow" factors and low-rank "fast"
factors; vpeft implements the single-product KronA form.

Initialisation: one factor zero (``B``), the other (``A``) Kaiming-uniform like LoRA's ``A``, so the
model is the frozen backbone at init. Default factor shape ``A: 32 x 32`` (then ``B: 24 x 24`` for
d = 768) -- the near-square split that minimises the parameter count; the KronA paper tunes the
factor shapes per model (its T5 shapes could not be checked against public code, none exists), so
set ``a_shape`` to match a reference setting.
ViT-B/16, q and v: 12 * 2 * (32 * 32 + 24 * 24) = 38,400 parameters (no ViT-B/16 count is published).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import QKV, ArchSpec, Target
from ..config import MethodConfig, check_float, check_subset
from ..errors import ConfigError
from ..layers.kron import KronALinear
from ..registry import register_method
from .base import REPARAMETER, Method

TARGETS = (*QKV, "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class KronAConfig(MethodConfig):
    """KronA.

    Attributes:
        a_shape: ``(a1, a2)``, the shape of factor A; a1 must divide each adapted output width and a2
            the input width (B's shape follows).
        scale: multiplier s of the update (> 0).
        targets: q, k, v (slices of a fused qkv, or the separate projections of Hugging Face backbones), proj,
            fc1, fc2; ``"qkv"`` is shorthand for q, k, v.
    """

    method = "krona"
    a_shape: tuple[int, int] = (32, 32)
    scale: float = 1.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", tuple(t for n in targets for t in (QKV if n == "qkv" else (n,))))
        super().__post_init__()

    def validate(self) -> None:
        shape = self.a_shape
        ok = isinstance(shape, tuple) and len(shape) == 2
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        if not ok:
            raise ConfigError(f"krona: a_shape={shape!r} is invalid; expected two integers >= 1, e.g. [32, 32]")
        check_float(self, "scale", 0.0, low_open=True)
        check_subset(self, "targets", TARGETS)


@register_method
class KronA(Method):
    config_cls = KronAConfig
    family = REPARAMETER
    paper = "Edalati et al., KronA: Parameter Efficient Tuning with Kronecker Adapter, 2022"
    mergeable = True
    kinds = ("vit", "swin")

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        return self.config.targets

    def check_target(self, model: nn.Module, spec: ArchSpec, target: Target) -> None:
        (a1, a2), base = self.config.a_shape, target.module
        width = target.slices[0][1] - target.slices[0][0] if target.slices else base.out_features
        if width % a1 or base.in_features % a2:
            raise ConfigError(
                f"krona: a_shape={[a1, a2]} does not tile {target.name} ({width} x {base.in_features} per target); "
                f"a1 must divide {width} and a2 must divide {base.in_features}"
            )

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        return KronALinear(target.module, self.config.a_shape, self.config.scale, target.slice_list)
