"""Backbone specifications: where blocks, attention, MLPs, norms and tokens live in a model.

Methods never hard-code module paths or widths; they ask the :class:`ArchSpec` returned by
:func:`get_spec`. Adding a backbone family means adding one builder here.
"""

from __future__ import annotations

from . import swin as _swin  # noqa: F401  (registers timm Swin)
from .hf import is_transformers_model, logits_of  # (registers Hugging Face ViT / CLIP vision)
from .spec import ArchSpec, BlockParts, get_spec, register_arch, supported_families

__all__ = [
    "ArchSpec",
    "BlockParts",
    "get_spec",
    "register_arch",
    "supported_families",
    "logits_of",
    "is_transformers_model",
]
