"""ArchSpec of timm's Swin Transformer (Liu et al., ICCV 2021).

Blocks run across the stages (``layers.{s}.blocks.{b}``); each has ``norm1``, window attention
(``attn.qkv`` fused, ``attn.proj``), ``norm2`` and an MLP (``mlp.fc1``, ``mlp.fc2``). The width doubles at
every stage (``PatchMerging`` between stages), so methods take widths from the modules they wrap, never
from ``spec.embed_dim`` (here the final width). Blocks read and write ``(B, H, W, C)`` maps, attention
runs on windows ``(B * windows, tokens, C)``; there are no class/prefix tokens (kind ``"swin"``).
"""

from __future__ import annotations

from torch import nn

from .spec import (
    ArchSpec,
    BlockParts,
    _cfg_input_size,
    _child,
    _linear,
    _module_name,
    _pair,
    _present,
    _unwrap,
    register_arch,
)

__all__: list[str] = []


def _is_timm_swin(model: nn.Module) -> bool:
    try:
        from timm.models.swin_transformer import SwinTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, SwinTransformer)


def _block_parts(outer: nn.Module, name: str) -> BlockParts:
    blk, p = _unwrap(outer, name)
    (attn, a), (mlp, m) = _child(blk, p, "attn"), _child(blk, p, "mlp")
    return BlockParts(
        block=name,
        norm1=_child(blk, p, "norm1")[1],
        attn=a,
        qkv=_linear(attn, a, "qkv"),
        proj=_linear(attn, a, "proj"),
        norm2=_child(blk, p, "norm2")[1],
        mlp=m,
        fc1=_linear(mlp, m, "fc1"),
        fc2=_linear(mlp, m, "fc2"),
    )


@register_arch("timm_swin", _is_timm_swin)
def _timm_swin(model: nn.Module) -> ArchSpec:
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
        head=_module_name(model, model.get_classifier()),
        post_blocks=_present(model, ("norm",)),
        stem=_present(model, ("patch_embed",)),
        embed_dim=int(model.num_features),
        num_prefix_tokens=0,
        patch_size=(int(ps[0]), int(ps[1])),
        image_size=_pair(getattr(model.patch_embed, "img_size", None)) or _cfg_input_size(model),
    )
