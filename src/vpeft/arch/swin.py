"""ArchSpec of timm's Swin Transformer (Liu et al., ICCV 2021).

Blocks run across the stages (``layers.{s}.blocks.{b}``); each has ``norm1``, window attention
(``attn.qkv`` fused, ``attn.proj``), ``norm2`` and an MLP (``mlp.fc1``, ``mlp.fc2``). The width doubles at
every stage (``PatchMerging`` between stages), so methods take widths from the modules they wrap, never
from ``spec.embed_dim`` (here the final width). Blocks read and write ``(B, H, W, C)`` maps, attention
runs on windows ``(B * windows, tokens, C)``; there are no class/prefix tokens (kind ``"swin"``).
"""

from __future__ import annotations

from torch import nn

from .family import TimmFamily, register_family
from .spec import (
    ArchSpec,
    BlockParts,
    cfg_input_size,
    child_of,
    linear_name,
    module_name,
    pair,
    present,
    unwrap,
)

__all__: list[str] = []


def _block_parts(outer: nn.Module, name: str) -> BlockParts:
    blk, p = unwrap(outer, name)
    (attn, a), (mlp, m) = child_of(blk, p, "attn"), child_of(blk, p, "mlp")
    return BlockParts(
        block=name,
        norm1=child_of(blk, p, "norm1")[1],
        attn=a,
        qkv=linear_name(attn, a, "qkv"),
        proj=linear_name(attn, a, "proj"),
        norm2=child_of(blk, p, "norm2")[1],
        mlp=m,
        fc1=linear_name(mlp, m, "fc1"),
        fc2=linear_name(mlp, m, "fc2"),
    )


def timm_swin_spec(model: nn.Module) -> ArchSpec:
    parts = tuple(
        _block_parts(block, f"layers.{s}.blocks.{b}")
        for s, stage in enumerate(model.layers)
        for b, block in enumerate(stage.blocks)
    )
    ps = model.patch_embed.patch_size
    return ArchSpec(
        arch="timm_swin",
        kind="swin",
        blocks=tuple(p.block for p in parts),
        parts=parts,
        head=module_name(model, model.get_classifier()),
        post_blocks=present(model, ("norm",)),
        stem=present(model, ("patch_embed",)),
        embed_dim=int(model.num_features),
        num_prefix_tokens=0,
        patch_size=(int(ps[0]), int(ps[1])),
        image_size=pair(getattr(model.patch_embed, "img_size", None)) or cfg_input_size(model),
    )


class TimmSwin(TimmFamily):
    name, model_class = "timm_swin", "swin_transformer:SwinTransformer"


register_family(TimmSwin(timm_swin_spec))
