"""CoCoOp: CoOp's context shifted per image by a light meta-network on the image feature.

Reference: Zhou, Yang, Loy & Liu, "Conditional Prompt Learning for Vision-Language Models", CVPR 2022.
Context ``v_m(x) = v_m + pi(x)``, ``pi = Linear(E, E/16) - ReLU - Linear(E/16, W)`` of the normalised image feature
``x`` (E: CLIP's embedding width, W: the text width); every image gets its own class weights, so the text tower runs
B x C prompts per batch (CoCoOp's cost). Paper setting: M = 4 initialised from "a photo of a", class at the end.
CLIP ViT-B/16 (E = W = 512): 4 * 512 + (512 * 32 + 32) + (32 * 512 + 512) = 2,048 + 33,312 = 35,360.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_int
from ..errors import ConfigError
from ..layers.prompt_slot import MAX_CONTEXT, ContextPrompt, init_context
from ..registry import register_method
from .base import ADDITION, Method
from .towers import check_clip


class ConditionalPrompt(ContextPrompt):
    """CoCoOp's prompt learner: a unified context plus the meta-net's per-image shift."""

    conditional = True
    per_image = True

    def __init__(self, base_layer: nn.Module, ctx: torch.Tensor, embed_dim: int, reduction: int) -> None:
        super().__init__(base_layer, ctx)
        hidden = max(1, embed_dim // reduction)
        width = ctx.shape[-1]
        self.meta_net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))

    def text_features(self, clip, class_names, templates, image_features=None) -> torch.Tensor:
        """``(B, C, E)`` unit-norm class weights, one set per image."""
        if image_features is None:
            raise ConfigError("cocoop: class weights depend on the image; pass image_features")
        shift = self.meta_net(F.normalize(image_features, dim=-1).to(self.ctx.dtype))  # (B, W)
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, M, W)
        embeds, eot = self.embeds(clip, class_names, ctx)
        feats = clip.encode_text_embeds(embeds, eot)
        return F.normalize(feats, dim=-1).view(ctx.shape[0], len(class_names), -1)


@dataclasses.dataclass(frozen=True)
class CoCoOpConfig(MethodConfig):
    """CoCoOp.

    Attributes:
        num_tokens: context length M (1..75).
        init: words to initialise the context from (M must not exceed their token count; the first M are used).
        reduction: the meta-net's hidden width is E // reduction (paper: 16).
    """

    method = "cocoop"
    num_tokens: int = 4
    init: str = "a photo of a"
    reduction: int = 16

    def validate(self) -> None:
        check_int(self, "num_tokens", 1, MAX_CONTEXT)
        check_int(self, "reduction", 1)
        if not isinstance(self.init, str):
            raise ConfigError(f"cocoop: init={self.init!r} is invalid; expected words or ''")


@register_method
class CoCoOp(Method):
    config_cls = CoCoOpConfig
    family = ADDITION
    paper = "Zhou et al., Conditional Prompt Learning for Vision-Language Models (CoCoOp), CVPR 2022"
    identity_at_init = False
    kinds = ("vit",)
    towers = ("text", "image")

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        check_clip(self, model, spec)

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        cfg = self.config
        ctx, _ = init_context(model, cfg.num_tokens, cfg.init, self.name)
        learner = ConditionalPrompt(model.prompt, ctx, model.embed_dim, cfg.reduction).to(ctx.device)
        set_module(model, "prompt", learner)
        return ["prompt"]
