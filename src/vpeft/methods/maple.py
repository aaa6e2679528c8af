"""MaPLe: multi-modal prompts, language prompts coupled to vision prompts, deep in both towers.

Reference: Khattak, Rasheed, Maaz, Khan & Khan, "MaPLe: Multi-modal Prompt Learning", CVPR 2023.
Language side: M context vectors in the text input (initialised from the first M tokens of "a photo of a", the rest
of the phrase kept as words), and new language prompts ``P_i`` (M x W_text, N(0, 0.02)) replacing them at the input
of text layers i = 1 .. J-1. Vision side: no free parameters; the vision prompts of layer i are
``F_i(P_i)``, ``F_i = Linear(W_text -> W_image)`` (i = 0 uses the input context), appended after the patch tokens at
layer 0 (through the image tower's pre-norm, as the patch tokens) and replacing them at layers 1 .. J-1;
class-token pooling ignores them. Paper setting: M = 2, J = 9.
CLIP ViT-B/16 (W_text = 512, W_image = 768): input context 2 * 512 = 1,024; deep language prompts
8 * 2 * 512 = 8,192; couplings 9 * (512 * 768 + 768) = 3,545,856; total 3,555,072.
At J = 1 MaPLe is its shallow form: CoOp's context in the text input and ``F_0(context)`` as prompt tokens at the
image tower's input only.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.prompt_slot import MAX_CONTEXT, ContextPrompt, init_context
from ..registry import register_method
from .base import ADDITION, Method
from .towers import check_clip


class MultiModalPrompt(ContextPrompt):
    """MaPLe's prompt learner: deep language prompts and their couplings to the image tower."""

    def __init__(self, base_layer: nn.Module, ctx: torch.Tensor, fixed, depth: int, image_width: int) -> None:
        super().__init__(base_layer, ctx, fixed=fixed)
        m, width = ctx.shape
        self.deep = nn.ParameterList(
            [
                nn.Parameter(nn.init.normal_(torch.empty(m, width, device=ctx.device), std=0.02))
                for _ in range(depth - 1)
            ]
        )
        self.couple = nn.ModuleList([nn.Linear(width, image_width, device=ctx.device) for _ in range(depth)])

    @property
    def depth(self) -> int:
        return len(self.couple)

    def language_prompts(self) -> list[torch.Tensor]:
        """The language prompts of layers 0 .. J-1 (layer 0: the input context)."""
        return [self.ctx, *self.deep]

    def vision_prompts(self, clip: nn.Module) -> list[torch.Tensor]:
        return [f(p) for f, p in zip(self.couple, self.language_prompts())]

    def text_features(self, clip, class_names, templates, image_features=None) -> torch.Tensor:
        embeds, eot = self.embeds(clip, class_names, self.ctx)
        return F.normalize(clip.encode_text_embeds(embeds, eot, deep=list(self.deep), deep_at=1), dim=-1)


@dataclasses.dataclass(frozen=True)
class MaPLeConfig(MethodConfig):
    """MaPLe.

    Attributes:
        num_tokens: prompt length M per layer (1..75).
        depth: J, the number of layers (from the input) that get prompts, in both towers (>= 1, <= tower depth).
        init: words whose first M token embeddings initialise the input context (the rest stay words); ``""``:
            N(0, 0.02) and no words.
    """

    method = "maple"
    num_tokens: int = 2
    depth: int = 9
    init: str = "a photo of a"

    def validate(self) -> None:
        check_int(self, "num_tokens", 1, MAX_CONTEXT)
        check_int(self, "depth", 1)
        if not isinstance(self.init, str):
            raise ConfigError(f"maple: init={self.init!r} is invalid; expected words or ''")


@register_method
class MaPLe(Method):
    config_cls = MaPLeConfig
    family = ADDITION
    paper = "Khattak et al., MaPLe: Multi-modal Prompt Learning, CVPR 2023"
    identity_at_init = False
    kinds = ("vit",)
    towers = ("text", "image")

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        check_clip(self, model, spec)
        depth = min(len(model.image_blocks()), len(model.text_blocks()))
        if self.config.depth > depth:
            raise UnsupportedBackboneError(f"maple: depth={self.config.depth} exceeds the towers' {depth} layers")

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        cfg = self.config
        ctx, ids = init_context(model, cfg.num_tokens, cfg.init, self.name)
        learner = MultiModalPrompt(model.prompt, ctx, ids[cfg.num_tokens :], cfg.depth, model.image_width)
        set_module(model, "prompt", learner)
        return ["prompt"]
