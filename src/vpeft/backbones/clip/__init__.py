"""CLIP backbones (both towers) from ``open_clip`` or Hugging Face ``transformers``, behind one interface.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.

:class:`ClipBackbone` holds an image tower, a text tower and ``logit_scale``, whatever library built them:

* ``image``: open_clip's ``VisionTransformer`` (its ``proj`` inside) or Hugging Face's ``CLIPVisionModel``
  (+ ``image_proj``, the ``visual_projection`` Linear): patch embedding, class token, positional embedding, pre-norm,
  blocks, post-norm, class-token pooling, projection;
* ``text``: :class:`OpenClipTextTower` (open_clip's token embedding, positional embedding, causal blocks, final norm
  and projection moved into one module) or Hugging Face's ``CLIPTextModel`` (+ ``text_proj``), pooled at the first
  end-of-text token (open_clip's argmax of the token ids is the same position: end-of-text has the largest id).

Both towers are run block by block here (:meth:`ClipBackbone.encode_image`, :meth:`ClipBackbone.encode_text_embeds`),
so prompt learners can start the text tower from *token embeddings* and place prompt tokens at any layer of either
tower. vpeft methods reach a tower by its sub-module (``backbone.image`` / ``backbone.text``), which has an ArchSpec of
its own (:mod:`vpeft.arch.clip`); the ArchSpec of the whole backbone is its image tower's (names under ``image.``).

open_clip's blocks use ``nn.MultiheadAttention``, whose q/k/v projection is a bare parameter; :func:`create` replaces
each by :class:`FusedSelfAttention` (same weights, the packed projection as an ``nn.Linear`` ``qkv``) so LoRA and the
other Linear-level methods see q, k and v as slices of one Linear, exactly as on timm ViTs.

Two slots take the vision-language methods: ``prompt`` (:class:`TemplatePrompt`: the text side, hand-written templates;
CoOp, CoCoOp and MaPLe wrap it) and ``image_adapter`` (identity; CLIP-Adapter wraps it).

Tokenisation uses CLIP's BPE (shipped inside ``open-clip-torch``, offline) for both libraries; a text that does not
fit the context (77 tokens) raises :class:`~vpeft.errors.ConfigError` instead of being truncated.

No weights are downloaded unless ``pretrained`` is given (open_clip tag or Hugging Face hub id).
"""

from __future__ import annotations

from .convert import hf_config, hf_from_open_clip, open_clip_from_hf, param_count
from .model import (
    CLIP_MEAN,
    CLIP_STD,
    TOWERS,
    ClipBackbone,
    ClipTokenizer,
    FusedSelfAttention,
    OpenClipTextTower,
    TemplatePrompt,
    create,
    fuse_attention,
)
from .testing import tiny_hf_clip, tiny_open_clip

__all__ = [
    "ClipBackbone",
    "FusedSelfAttention",
    "OpenClipTextTower",
    "TemplatePrompt",
    "ClipTokenizer",
    "create",
    "fuse_attention",
    "tiny_open_clip",
    "tiny_hf_clip",
    "hf_config",
    "hf_from_open_clip",
    "open_clip_from_hf",
    "param_count",
    "TOWERS",
    "CLIP_MEAN",
    "CLIP_STD",
]
