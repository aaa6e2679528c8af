"""Tiny random-init CLIP backbones for tests (open_clip and Hugging Face), no weights downloaded."""

from __future__ import annotations

import torch

from .convert import hf_config
from .model import ClipBackbone, fuse_attention

__all__ = ["tiny_hf_clip", "tiny_open_clip"]


def tiny_open_clip(
    width: int = 64,
    text_width: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    seed: int = 0,
    quick_gelu: bool = True,
) -> ClipBackbone:
    """A random-init open_clip CLIP small enough for tests (real BPE vocabulary, 77-token context)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(
        layers=layers, width=width, head_width=width // 2, image_size=image_size, patch_size=patch_size
    )
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=2, layers=layers)
    model = CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    fuse_attention(model)
    return ClipBackbone("open_clip", model, "open_clip:tiny")


def tiny_hf_clip(
    width: int = 64,
    text_width: int = 32,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    seed: int = 0,
) -> ClipBackbone:
    """A random-init ``transformers.CLIPModel`` small enough for tests (same shapes as :func:`tiny_open_clip`)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(hf_config(width, text_width, layers, image_size, patch_size, embed_dim))
    return ClipBackbone("hf", model, "hf:tiny")


# ---- weight conversion open_clip <-> Hugging Face ------------------------------------------------------------
