"""Local configs of the OpenAI CLIPs on the Hugging Face hub, so ``hf:`` names build with random weights offline.

A random-weight ``hf:<hub id>`` backbone needs only the model's ``config.json``; for the names below vpeft builds it
from these numbers instead of reading the hub. They are the ViT image towers and text transformers of Radford et
al. 2021 (the CLIP-ViT hyperparameter table of its appendix: ViT-B/32, ViT-B/16, ViT-L/14 and ViT-L/14@336px;
embedding width, image width and layers, text width, heads and layers; 64-wide heads on the image side), the same
numbers open_clip ships in its model configs (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``;
``tests/test_offline.py`` checks each against them), in transformers' ``CLIPConfig`` field names with the MLP at
4x the width, QuickGELU, LayerNorm eps 1e-5, a 49,408-token vocabulary and a 77-token context.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOCAL_HF_CLIP", "local_hf_config"]

# hub id -> (embed dim, image size, patch, image width, image layers, text width, text heads, text layers)
_OPENAI: dict[str, tuple[int, int, int, int, int, int, int, int]] = {
    "openai/clip-vit-base-patch32": (512, 224, 32, 768, 12, 512, 8, 12),
    "openai/clip-vit-base-patch16": (512, 224, 16, 768, 12, 512, 8, 12),
    "openai/clip-vit-large-patch14": (768, 224, 14, 1024, 24, 768, 12, 12),
    "openai/clip-vit-large-patch14-336": (768, 336, 14, 1024, 24, 768, 12, 12),
}


def _config(embed: int, size: int, patch: int, width: int, layers: int, twidth: int, theads: int, tlayers: int):
    common: dict[str, Any] = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=embed)
    text = dict(
        common,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=twidth,
        intermediate_size=4 * twidth,
        num_attention_heads=theads,
        num_hidden_layers=tlayers,
        bos_token_id=0,  # as in the hub's config.json (vpeft pools at CLIP's end-of-text id, 49407, whatever these)
        eos_token_id=2,
        pad_token_id=1,
    )
    vision = dict(
        common,
        image_size=size,
        patch_size=patch,
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=width // 64,
        num_hidden_layers=layers,
    )
    return {"text_config": text, "vision_config": vision, "projection_dim": embed, "logit_scale_init_value": 2.6592}


LOCAL_HF_CLIP: dict[str, dict[str, Any]] = {name: _config(*numbers) for name, numbers in _OPENAI.items()}
"""``CLIPConfig`` keyword arguments by hub id."""


def local_hf_config(repo: str, **overrides: Any):
    """The ``transformers.CLIPConfig`` of hub id ``repo`` from :data:`LOCAL_HF_CLIP` (top-level ``overrides`` set
    on it), or None for another name."""
    if repo not in LOCAL_HF_CLIP:
        return None
    from transformers import CLIPConfig

    cfg = CLIPConfig(**LOCAL_HF_CLIP[repo])
    cfg.update(overrides)
    return cfg
