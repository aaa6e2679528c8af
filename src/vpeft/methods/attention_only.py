"""Attention-only fine-tuning: train the multi-head self-attention weights of every block.

Reference: Touvron, Cord, El-Nouby, Verbeek & Jegou, "Three things everyone should know about
Vision Transformers", ECCV 2022 (Sec. 4, "fine-tuning attention is all you need"): fine-tuning the
weights of the MHSA layers only (the fused q/k/v projection and the output projection, weights
and biases) is enough to adapt a ViT to a new resolution or classification task; everything else
stays frozen and is shared across tasks. Nothing is added, so the method trivially "merges".
ViT-B/16: per block qkv 768 * 2304 + 2304 and proj 768 * 768 + 768 = 2,362,368 (one third of a
block's 7,087,872), times 12 = 28,348,416 parameters (no absolute count for this setting was found in the paper).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..arch import ArchSpec, Target
from ..config import MethodConfig
from ..registry import register_method
from .base import SPECIFICATION, Method


@dataclasses.dataclass(frozen=True)
class AttentionOnlyConfig(MethodConfig):
    """Attention-only fine-tuning: no options."""

    method = "attention_only"


@register_method
class AttentionOnly(Method):
    config_cls = AttentionOnlyConfig
    family = SPECIFICATION
    paper = "Touvron et al., Three things everyone should know about Vision Transformers, ECCV 2022"
    mergeable = True
    kinds = ("vit", "swin")

    roles = ("qkv", "proj")  # the fused qkv (timm) or the separate q, k, v (Hugging Face), and the output projection

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> None:
        return None  # nothing is added: the projections' own weights train

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        return [f"{t.name}.{name}" for t in self.targets(model, spec) for name, _ in t.module.named_parameters()]
