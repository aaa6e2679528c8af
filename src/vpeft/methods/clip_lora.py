"""CLIP-LoRA: LoRA on the q, k and v projections of both CLIP towers.

Reference: Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024.
Setting (the paper's): rank 2, alpha 1, dropout 0.25 on the LoRA input, q, k, v of every block of the image and the
text encoder. Each tower is adapted through its own ArchSpec (:mod:`vpeft.methods.towers`): LoRA on the q/k/v
slices of open_clip's fused ``qkv`` Linear, or on Hugging Face's separate ``q_proj/k_proj/v_proj``.
CLIP ViT-B/16 (image width 768, text width 512, 12 + 12 blocks), r = 2:
image 12 * 3 * (2*768 + 768*2) = 110,592; text 12 * 3 * (2*512 + 512*2) = 73,728; total 184,320.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec
from ..arch.clip import is_clip_spec
from ..config import MethodConfig, check_float, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..registry import register_method
from .base import REPARAMETER, Method
from .lora import LoRA, LoRAConfig
from .towers import inject_tower, split_targets

QKV_BOTH = ("image.q", "image.k", "image.v", "text.q", "text.k", "text.v")


@dataclasses.dataclass(frozen=True)
class CLIPLoRAConfig(MethodConfig):
    """CLIP-LoRA.

    Attributes:
        r: rank (>= 1).
        alpha: LoRA scale numerator (the update is scaled by alpha / r).
        dropout: dropout on the LoRA branch input, in [0, 1).
        targets: tower-qualified projections: ``<image|text>.<q|k|v|proj|fc1|fc2>``.
    """

    method = "clip_lora"
    r: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    targets: tuple[str, ...] = QKV_BOTH

    def validate(self) -> None:
        check_int(self, "r", 1)
        check_float(self, "alpha", 0.0, low_open=True)
        check_float(self, "dropout", 0.0, 0.999)
        for tower, roles in split_targets(self.targets, self.method).items():
            if not roles:
                raise ConfigError(f"clip_lora: target {tower!r} names no projection; use e.g. {tower}.q")
            LoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=roles)

    def per_tower(self) -> dict[str, LoRAConfig]:
        return {
            tower: LoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=roles)
            for tower, roles in split_targets(self.targets, self.method).items()
        }


@register_method
class CLIPLoRA(Method):
    config_cls = CLIPLoRAConfig
    family = REPARAMETER
    paper = "Zanella & Ben Ayed, Low-Rank Few-Shot Adaptation of Vision-Language Models, CVPRW 2024"
    mergeable = True
    kinds = ("vit",)
    towers = ("image", "text")

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        if not is_clip_spec(spec):
            raise UnsupportedBackboneError(
                f"clip_lora adapts both towers of a CLIP backbone (vpeft.backbones.clip.create); "
                f"{spec.arch} is image-only (use lora there)"
            )

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        return [
            n
            for tower, cfg in self.config.per_tower().items()
            for n in inject_tower(model, tower, LoRA(cfg), self.name)
        ]
