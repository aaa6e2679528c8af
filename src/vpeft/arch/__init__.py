"""Backbone specifications: where blocks, attention, MLPs, norms and tokens live in a model.

Methods never hard-code module paths or widths; they ask the :class:`ArchSpec` returned by
:func:`get_spec`, and resolve the roles they adapt (q, v, qkv, fc1, pw, ...) to :class:`Target` s with
:func:`resolve` (``resolve(model, spec, roles)``). Everything else a caller needs to know about a backbone (its
tokens, features, head, gradient checkpointing) is asked of its :class:`Family` (:func:`get_family`); adding a
backbone family means registering one :class:`Family` (:mod:`vpeft.arch.family`).
"""

from __future__ import annotations

from . import family as _family  # noqa: F401  (registers timm ViT / EfficientNet / ConvNeXt)
from . import swin as _swin  # noqa: F401  (registers timm Swin)
from .family import (
    FAMILIES,
    Family,
    TimmFamily,
    get_family,
    get_spec,
    register_arch,
    register_family,
    supported_families,
)
from .hf import is_transformers_model, logits_of  # (registers Hugging Face ViT / CLIP vision)
from .spec import ArchSpec, BlockParts
from .targets import (
    BLOCK_ROLES,
    CONV_ROLES,
    LINEAR_ROLES,
    MODULE_ROLES,
    QKV,
    ROLES,
    AttentionLayout,
    Target,
    attention_layout,
    check_roles,
    conv_modules,
    final_norm,
    input_size,
    patch_grid,
    resolve,
    role_modules,
    target_names,
)

__all__ = [
    "ArchSpec",
    "BlockParts",
    "get_spec",
    "get_family",
    "register_arch",
    "register_family",
    "FAMILIES",
    "Family",
    "TimmFamily",
    "supported_families",
    "logits_of",
    "is_transformers_model",
    "QKV",
    "LINEAR_ROLES",
    "MODULE_ROLES",
    "BLOCK_ROLES",
    "CONV_ROLES",
    "ROLES",
    "Target",
    "AttentionLayout",
    "resolve",
    "target_names",
    "role_modules",
    "conv_modules",
    "check_roles",
    "input_size",
    "patch_grid",
    "final_norm",
    "attention_layout",
]
