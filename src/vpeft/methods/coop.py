"""CoOp: learned context vectors in place of the hand-written words of a CLIP prompt.

Reference: Zhou, Yang, Loy & Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022.
The text tower reads ``[SOS] v_1 ... v_M [CLASS] . [EOS]``: M learnable vectors of the text width in front of the
class name's token embeddings (``class_position="end"``; ``"middle"`` puts the name between the two halves,
``"front"`` before them). Unified context (one set shared by all classes) or class-specific (CSC: one set per class,
``num_classes`` of them). Initialisation: N(0, 0.02), or the token embeddings of ``init`` words (``"a photo of a"``,
then M is their token count). Both towers stay frozen; the class weights are the text features of the prompts.
CLIP ViT-B/16 (text width 512): M = 16 unified: 16 * 512 = 8,192; M = 4: 2,048; CSC: C * M * 512.

The prompt learner takes the backbone's ``prompt`` slot (:class:`~vpeft.backbones.clip.ClipBackbone`); the
zero-shot task (:mod:`vpeft.tasks.zeroshot`) asks the slot for class weights, so a trained unified context
describes any class list (base-to-novel, cross-dataset); a CSC context only the ``num_classes`` it was built for.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import set_module
from ..arch import ArchSpec
from ..config import MethodConfig, check_choice, check_int
from ..errors import ConfigError
from ..layers.prompt_slot import MAX_CONTEXT, ContextPrompt, init_context
from ..registry import register_method
from .base import ADDITION, Method
from .towers import check_clip

__all__ = ["CoOpConfig", "CoOp"]


@dataclasses.dataclass(frozen=True)
class CoOpConfig(MethodConfig):
    """CoOp.

    Attributes:
        num_tokens: context length M (>= 1; at most 75, CLIP's 77 positions minus start/end of text).
        init: words to initialise the context from (``"a photo of a"``: M must equal their token count);
            ``""``: N(0, 0.02).
        class_position: where the class name goes: ``end``, ``middle`` or ``front``.
        class_specific: one context per class (CSC) instead of one shared context.
        num_classes: the number of classes of a class-specific context (0 for a unified one).
    """

    method = "coop"
    num_tokens: int = 16
    init: str = ""
    class_position: str = "end"
    class_specific: bool = False
    num_classes: int = 0

    def validate(self) -> None:
        if isinstance(self.num_tokens, int) and self.num_tokens > MAX_CONTEXT:
            raise ConfigError(
                f"{self.method}: num_tokens={self.num_tokens} does not fit CLIP's 77-token context "
                f"(at most {MAX_CONTEXT} context vectors besides start and end of text)"
            )
        check_int(self, "num_tokens", 1, MAX_CONTEXT)
        check_choice(self, "class_position", ("end", "middle", "front"))
        if not isinstance(self.init, str):
            raise ConfigError(f"{self.method}: init={self.init!r} is invalid; expected words or ''")
        if self.class_specific:
            check_int(self, "num_classes", 1)
        elif self.num_classes != 0:
            raise ConfigError(
                f"{self.method}: num_classes={self.num_classes!r} is only used with class_specific=True; leave it 0"
            )


@register_method
class CoOp(Method):
    config_cls = CoOpConfig
    family = ADDITION
    paper = "Zhou et al., Learning to Prompt for Vision-Language Models (CoOp), IJCV 2022"
    identity_at_init = False
    kinds = ("vit",)
    towers = ("text",)

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        check_clip(self, model, spec)

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        cfg = self.config
        ctx, ids = init_context(model, cfg.num_tokens, cfg.init, self.name)
        if ids and len(ids) != cfg.num_tokens:
            raise ConfigError(
                f"coop: init {cfg.init!r} is {len(ids)} tokens; set num_tokens={len(ids)} (CoOp's context is the words)"
            )
        if cfg.class_specific:
            ctx = ctx.unsqueeze(0).repeat(cfg.num_classes, 1, 1)
            if not ids:
                nn.init.normal_(ctx, std=0.02)
        set_module(model, "prompt", ContextPrompt(model.prompt, ctx, position=cfg.class_position))
        return ["prompt"]
