"""Weight converters between open_clip and Hugging Face CLIP backbones (same architecture, renamed tensors)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from .model import ClipBackbone
from .towers import EOT, SOT

__all__ = ["hf_config", "hf_from_open_clip", "open_clip_from_hf", "param_count"]


def hf_config(
    width: int, text_width: int, layers: int, image_size: int, patch_size: int, embed_dim: int, act: str = "quick_gelu"
):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=text_width,
        intermediate_size=4 * text_width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, text_width // 16),
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=act,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def _pairs(layers_img: int, layers_txt: int) -> list[tuple[str, str, str]]:
    """(open_clip name, HF name, how) for every tensor; how: "" copy, "T" transpose, "qkv" split into q/k/v."""
    out = [
        ("image.conv1.weight", "image.embeddings.patch_embedding.weight", ""),
        ("image.class_embedding", "image.embeddings.class_embedding", ""),
        ("image.positional_embedding", "image.embeddings.position_embedding.weight", ""),
        ("image.proj", "image_proj.weight", "T"),
        ("text.token_embedding.weight", "text.embeddings.token_embedding.weight", ""),
        ("text.positional_embedding", "text.embeddings.position_embedding.weight", ""),
        ("text.text_projection", "text_proj.weight", "T"),
        ("logit_scale", "logit_scale", ""),
    ]
    norms = [
        ("image.ln_pre", "image.pre_layrnorm"),
        ("image.ln_post", "image.post_layernorm"),
        ("text.ln_final", "text.final_layer_norm"),
    ]
    for tower, n in (("image", layers_img), ("text", layers_txt)):
        for i in range(n):
            a, b = f"{tower}.transformer.resblocks.{i}", f"{tower}.encoder.layers.{i}"
            norms += [(f"{a}.ln_1", f"{b}.layer_norm1"), (f"{a}.ln_2", f"{b}.layer_norm2")]
            for p in ("weight", "bias"):
                out += [
                    (f"{a}.attn.qkv.{p}", f"{b}.self_attn.{{}}_proj.{p}", "qkv"),
                    (f"{a}.attn.out_proj.{p}", f"{b}.self_attn.out_proj.{p}", ""),
                    (f"{a}.mlp.c_fc.{p}", f"{b}.mlp.fc1.{p}", ""),
                    (f"{a}.mlp.c_proj.{p}", f"{b}.mlp.fc2.{p}", ""),
                ]
    out += [(f"{a}.{p}", f"{b}.{p}", "") for a, b in norms for p in ("weight", "bias")]
    return out


def _clean(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v for k, v in sd.items()}


def hf_from_open_clip(clip: ClipBackbone) -> ClipBackbone:
    """The same network as a Hugging Face ``CLIPModel`` (plain open_clip ViT towers: class-token pooling, GELU or
    QuickGELU, LayerNorm eps 1e-5, no bias in the patch embedding)."""
    from transformers import CLIPModel

    if clip.source != "open_clip":
        raise ConfigError(f"hf_from_open_clip needs an open_clip backbone, got {clip.source!r}")
    blk = clip.image_blocks()[0]
    act = "quick_gelu" if type(blk.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    cfg = hf_config(
        clip.image_width,
        clip.text_width,
        len(clip.image_blocks()),
        clip.image.image_size[0],
        clip.image.patch_size[0],
        clip.embed_dim,
        act,
    )
    cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers = (
        len(clip.image_blocks()),
        len(clip.text_blocks()),
    )
    cfg.vision_config.num_attention_heads = clip.image_blocks()[0].attn.num_heads
    cfg.text_config.num_attention_heads = clip.text_blocks()[0].attn.num_heads
    cfg.vision_config.intermediate_size = blk.mlp.c_fc.out_features
    cfg.text_config.intermediate_size = clip.text_blocks()[0].mlp.c_fc.out_features
    cfg.text_config.vocab_size = clip.token_embedding().num_embeddings
    cfg.text_config.max_position_embeddings = clip.context_length
    out = ClipBackbone("hf", CLIPModel(cfg), clip.pretrained_cfg["vpeft_backbone"].replace("open_clip:", "hf:"))
    src, dst = _clean(clip.state_dict()), out.state_dict()
    with torch.no_grad():
        for a, b, how in _pairs(len(clip.image_blocks()), len(clip.text_blocks())):
            t = src[a]
            if how == "qkv":
                for name, part in zip("qkv", t.chunk(3, dim=0)):
                    dst[b.format(name)].copy_(part)
            else:
                dst[b].copy_(t.T if how == "T" else t)
    return out


def open_clip_from_hf(clip: ClipBackbone, like: ClipBackbone) -> ClipBackbone:
    """Copy a Hugging Face backbone's weights into ``like`` (an open_clip backbone of the same shapes), in place."""
    if clip.source != "hf" or like.source != "open_clip":
        raise ConfigError("open_clip_from_hf needs a Hugging Face backbone and an open_clip one of the same shapes")
    src, dst = _clean(clip.state_dict()), _clean(like.state_dict())
    with torch.no_grad():
        for a, b, how in _pairs(len(like.image_blocks()), len(like.text_blocks())):
            if how == "qkv":
                dst[a].copy_(torch.cat([src[b.format(n)] for n in "qkv"], dim=0))
            else:
                dst[a].copy_(src[b].T if how == "T" else src[b])
    return like


def param_count(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
