"""The CLIP ``prompt`` slot: its declared protocol and the learned-context prompt the prompt learners share.

A two-tower :class:`~vpeft.backbones.clip.ClipBackbone` asks the object in its ``prompt`` slot for its class
weights and its image-side prompts; that object implements :class:`PromptSlot`. The slot's default is the
backbone's hand-written template prompt; CoOp (:class:`ContextPrompt`), CoCoOp (a conditional context) and MaPLe
(a multi-modal, deep context) wrap it. :class:`ContextPrompt` holds the code they share: the token layout of
``[SOS] context [CLASS] . [EOS]`` prompts and the embedding of a context into them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Wrapper

__all__ = ["MAX_CONTEXT", "ContextPrompt", "PromptSlot", "init_context"]


@runtime_checkable
class PromptSlot(Protocol):
    """What a CLIP backbone asks of its ``prompt`` slot.

    Attributes:
        conditional: the class weights depend on the image (CoCoOp): :meth:`text_features` takes its features.
    """

    conditional: bool

    def text_features(
        self, clip: Any, class_names: Sequence[str], templates: Sequence[str], image_features: Any = None
    ) -> torch.Tensor:
        """``(C, E)`` unit-norm class weights (``(B, C, E)`` when conditional)."""
        ...

    def vision_prompts(self, clip: Any) -> list[torch.Tensor | None] | None:
        """Per-layer prompt tokens for the image tower (MaPLe), or ``None``."""
        ...

    def check_classes(self, num_classes: int) -> None:
        """Raise :class:`ConfigError` if the slot cannot describe ``num_classes`` classes (class-specific contexts)."""
        ...


MAX_CONTEXT = 75  # 77 positions minus start and end of text


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
