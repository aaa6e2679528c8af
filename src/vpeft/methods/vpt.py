"""Visual Prompt Tuning, shallow and deep (Jia et al., "Visual Prompt Tuning", ECCV 2022).

Placement: p learnable tokens are inserted after the class (and register) tokens.
``vpt_shallow``: at the input of the first block only; they then travel through all blocks.
``vpt_deep``: a new set at the input of every block, replacing the previous block's prompt outputs.
The prompts are removed after the last block, so pooling and the head see the usual layout.
Initialisation as the paper's code: uniform(-b, b), b = sqrt(6 / (3 * patch_h * patch_w + d));
prompt dropout 0.1.
ViT-B/16, p = 10: deep 12 * 10 * 768 = 92,160 parameters; shallow 10 * 768 = 7,680.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from ..arch import ArchSpec, Target
from ..config import MethodConfig, check_float, check_int
from ..layers import PromptedBlock
from ..layers.prompt import vpt_init_bound
from ..registry import register_method
from .base import ADDITION, Method


@dataclasses.dataclass(frozen=True)
class VPTShallowConfig(MethodConfig):
    """VPT-Shallow.

    Attributes:
        num_tokens: prompt length p (>= 1).
        dropout: dropout on the prompt tokens, in [0, 1).
    """

    method = "vpt_shallow"
    num_tokens: int = 10
    dropout: float = 0.1

    def validate(self) -> None:
        check_int(self, "num_tokens", 1)
        check_float(self, "dropout", 0.0, 0.999)


@dataclasses.dataclass(frozen=True)
class VPTDeepConfig(VPTShallowConfig):
    """VPT-Deep: same options as VPT-Shallow, prompts at every block."""

    method = "vpt_deep"


class _VPT(Method):
    family = ADDITION
    paper = "Jia et al., Visual Prompt Tuning, ECCV 2022"
    identity_at_init = False
    kinds = ("vit",)
    deep: ClassVar[bool] = False

    roles = ("block",)

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module | None:
        i, p, last = target.index, self.config.num_tokens, spec.depth - 1
        new = p if (i == 0 or self.deep) else 0
        if not new and i != last:
            return None  # the prompts of the first block pass through unchanged
        return PromptedBlock(
            target.module,
            num_prefix_tokens=spec.num_prefix_tokens,
            in_prompts=0 if i == 0 else p,
            new_prompts=new,
            dim=spec.embed_dim,
            bound=vpt_init_bound(spec.patch_size, spec.embed_dim),
            strip=i == last,
            dropout=self.config.dropout,
        )


@register_method
class VPTShallow(_VPT):
    config_cls = VPTShallowConfig


@register_method
class VPTDeep(_VPT):
    config_cls = VPTDeepConfig
    deep = True
