"""Backbone specifications: where blocks, attention, MLPs, norms and tokens live in a model.

Methods never hard-code module paths or widths; they ask the :class:`ArchSpec` returned by
:func:`get_spec`, and resolve the roles they adapt (q, v, qkv, fc1, pw, ...) to :class:`Target` s with
:func:`resolve` (``resolve(model, spec, roles)``). Adding a backbone family means adding one builder here.
"""

from __future__ import annotations

from . import swin as _swin  # noqa: F401  (registers timm Swin)
from .hf import is_transformers_model, logits_of  # (registers Hugging Face ViT / CLIP vision)
from .spec import ArchSpec, BlockParts, get_spec, register_arch, supported_families
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
    "register_arch",
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
