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
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._modules import set_module
from ..arch import ArchSpec
from ..arch.clip import is_clip_spec
from ..config import MethodConfig, check_choice, check_int
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers import Wrapper
from ..registry import register_method
from .base import ADDITION, Method

__all__ = ["CoOpConfig", "CoOp", "ContextPrompt", "check_clip", "init_context"]

MAX_CONTEXT = 75  # 77 positions minus start and end of text


def check_clip(method: Method, model: nn.Module, spec: ArchSpec, slot: str = "prompt") -> None:
    """Raise unless ``model`` is a two-tower CLIP whose ``slot`` is free."""
    if not is_clip_spec(spec):
        raise UnsupportedBackboneError(
            f"{method.name} learns CLIP prompts and needs a two-tower CLIP backbone (vpeft.backbones.clip.create); "
            f"{spec.arch} has no text tower"
        )
    current = getattr(model, slot)
    if isinstance(current, Wrapper):
        raise ConfigError(f"{method.name}: the backbone's {slot} slot already holds {type(current).__name__}")


def init_context(clip: nn.Module, num_tokens: int, init: str, method: str) -> tuple[torch.Tensor, list[int]]:
    """``(M, W)`` initial context vectors and the ids of the words they start from (random: ``[]``)."""
    if not init:
        ctx = torch.empty(num_tokens, clip.text_width, device=clip.device)
        return nn.init.normal_(ctx, std=0.02), []
    ids = clip.tokenizer.encode(init.replace("_", " "))
    if len(ids) < num_tokens:
        raise ConfigError(
            f"{method}: init {init!r} is {len(ids)} tokens, fewer than num_tokens={num_tokens}; "
            f"set num_tokens <= {len(ids)} or init=''"
        )
    with torch.no_grad():
        emb = clip.embed_tokens(torch.tensor([ids], device=clip.device))[0]
    return emb[:num_tokens].clone(), ids


class ContextPrompt(Wrapper):
    """Context vectors in the text tower's input (CoOp); the ``prompt`` slot interface of ``TemplatePrompt``.

    Args:
        base_layer: the slot's template prompt (kept, unused while this learner is in place).
        ctx: ``(M, W)`` unified or ``(C, M, W)`` class-specific initial context.
        fixed: token ids after the learned ones that stay words (MaPLe: ``"of a"`` of ``"a photo of a"``).
        position: class name at the ``end``, ``middle`` or ``front``.
    """

    conditional = False

    def __init__(self, base_layer: nn.Module, ctx: torch.Tensor, fixed: Sequence[int] = (), position: str = "end"):
        super().__init__(base_layer)
        self.ctx = nn.Parameter(ctx)
        self.position = position
        self.fixed = tuple(fixed)
        self.__dict__["_layouts"] = {}

    @property
    def num_tokens(self) -> int:
        return self.ctx.shape[-2]

    def check_classes(self, num_classes: int) -> None:
        if self.ctx.dim() == 3 and self.ctx.shape[0] != num_classes:
            raise ConfigError(
                f"{type(self).__name__}: the class-specific context was built for {self.ctx.shape[0]} classes, the "
                f"task has {num_classes}; use a unified context (class_specific=False) to change class lists"
            )

    def layout(self, clip: nn.Module, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids (C, L), context positions (C, M), pooled positions (C,))`` of every class's prompt (cached)."""
        key = (tuple(class_names), str(clip.device))
        if key not in self._layouts:
            tok, m, rows, pos = clip.tokenizer, self.num_tokens, [], []
            hold = tok.encode("X")[0]
            dot = tok.encode(".")
            for name in class_names:
                words = tok.encode(name)
                if self.position == "end":
                    parts, start = [hold] * m + list(self.fixed) + words + dot, [0]
                elif self.position == "front":
                    parts, start = words + [hold] * m + list(self.fixed) + dot, [len(words)]
                else:
                    half = m // 2
                    parts = [hold] * half + words + [hold] * (m - half) + list(self.fixed) + dot
                    start = [0, half + len(words)]
                try:
                    rows.append(tok.ids(parts))
                except ConfigError:
                    raise ConfigError(
                        f"{type(self).__name__}: the prompt of class {name!r} ({len(parts) + 2} tokens with "
                        f"{m} context vectors) does not fit CLIP's context of {tok.context_length} tokens"
                    ) from None
                spans = [m] if len(start) == 1 else [half, m - half]
                pos.append([1 + s + j for s, n in zip(start, spans) for j in range(n)])
            ids = tok.pad(rows).to(clip.device)
            self._layouts[key] = (ids, torch.tensor(pos, device=clip.device), clip.eot_positions(ids))
        return self._layouts[key]

    def embeds(self, clip: nn.Module, class_names: Sequence[str], ctx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Prompt embeddings with ``ctx`` (``(M, W)``, ``(C, M, W)`` or per image ``(B, M, W)``) in place.

        Returns ``(embeds, eot)``: ``(C, L, W)`` (``(B * C, L, W)`` for per-image contexts) and pooled positions.
        """
        ids, pos, eot = self.layout(clip, class_names)
        c = ids.shape[0]
        base = clip.embed_tokens(ids)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        if ctx.shape[0] == c and not getattr(self, "per_image", False):
            rows = torch.arange(c, device=ids.device)[:, None].expand_as(pos)
            return base.index_put((rows, pos), ctx.to(base.dtype)), eot
        b = ctx.shape[0]  # per image: every class with every image's context
        rows = torch.arange(b * c, device=ids.device)[:, None].expand(b * c, pos.shape[1])
        full = base.repeat(b, 1, 1)
        values = ctx[:, None].expand(b, c, -1, -1).reshape(b * c, *ctx.shape[1:])
        return full.index_put((rows, pos.repeat(b, 1)), values.to(base.dtype)), eot.repeat(b)

    def vision_prompts(self, clip: nn.Module):
        return None

    def text_features(self, clip, class_names, templates, image_features=None) -> torch.Tensor:
        """``(C, E)`` unit-norm class weights (``templates`` are ignored: the context replaces them)."""
        embeds, eot = self.embeds(clip, class_names, self.ctx)
        return F.normalize(clip.encode_text_embeds(embeds, eot), dim=-1)

    def extra_repr(self) -> str:
        return f"ctx={tuple(self.ctx.shape)}, position={self.position!r}"


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
