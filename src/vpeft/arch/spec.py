"""ArchSpec, the helpers spec builders share, and the timm VisionTransformer / EfficientNet / ConvNeXt builders
(registered as families in :mod:`vpeft.arch.family`)."""

from __future__ import annotations

import dataclasses

from torch import nn

__all__ = ["ArchSpec", "BlockParts", "timm_convnext_spec", "timm_efficientnet_spec", "timm_vit_spec"]


@dataclasses.dataclass(frozen=True)
class BlockParts:
    """Qualified module names inside one transformer block (empty string: not present).

    ``qkv`` is a fused q/k/v projection (timm); backbones with separate projections (Hugging Face) name
    them in ``q``, ``k``, ``v`` instead. ``mlp`` is empty where the MLP is not one module. ``attention`` is the
    kind of the attention layer (``"fused"``: timm ``Attention``; ``"separate"``: Hugging Face q/k/v/output
    projections as direct children; ``""``: another kind), see :func:`vpeft.arch.targets.attention_layout`.
    """

    block: str
    norm1: str = ""
    attn: str = ""
    qkv: str = ""
    proj: str = ""
    norm2: str = ""
    mlp: str = ""
    fc1: str = ""
    fc2: str = ""
    q: str = ""
    k: str = ""
    v: str = ""
    attention: str = ""


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Where things are in a backbone.

    Attributes:
        arch: builder name, e.g. ``"timm_vit"`` (also readable as ``family``).
        kind: ``"vit"`` (a token sequence of one width: class/register tokens + patch tokens), ``"swin"``
            (hierarchical windowed transformers: per-stage widths, no prefix tokens, blocks on (B, H, W, C)
            maps -- widths must come from the modules, never ``embed_dim``) or ``"cnn"`` (feature-map models).
        blocks: qualified names of the repeated blocks, input to output.
        parts: per-block part names (transformers only).
        head: qualified name of the classifier module ("" when the model has none).
        post_blocks: modules between the last block and the head (final norms, conv head).
        stem: modules before the first block (patch embedding, stem conv).
        embed_dim: token width (ViTs), or the final feature width (Swin, CNNs).
        num_prefix_tokens: class + register tokens in front of the patch tokens.
        patch_size: (h, w) of a patch, transformers only.
        image_size: (h, w) of the input images the backbone was built for ((0, 0): unknown).
        final_norm: the module normalising the whole token sequence after the last block ("" when none does;
            it may be an ``nn.Identity`` placeholder, e.g. timm's ``norm`` on average-pooled ViTs).
        attention: how the blocks' attention layers can be recomputed: ``"fused"`` (timm ``Attention``, fused
            qkv), ``"separate"`` (Hugging Face, separate q/k/v/output projections), ``""`` (not supported).

    Roles (q, k, v, qkv, proj, fc1, fc2, pw, kxk, norms, blocks) resolve to modules and output slices through
    :meth:`targets` (:func:`vpeft.arch.targets.resolve`).
    """

    arch: str
    kind: str
    blocks: tuple[str, ...]
    head: str
    parts: tuple[BlockParts, ...] = ()
    post_blocks: tuple[str, ...] = ()
    stem: tuple[str, ...] = ()
    embed_dim: int = 0
    num_prefix_tokens: int = 0
    patch_size: tuple[int, int] = (0, 0)
    image_size: tuple[int, int] = (0, 0)
    final_norm: str = ""
    attention: str = ""

    @property
    def family(self) -> str:
        """The builder name, the same value as :attr:`arch` (kept for code written before the rename)."""
        return self.arch

    @property
    def depth(self) -> int:
        return len(self.blocks)


def module_name(model: nn.Module, target: nn.Module | None) -> str:
    if target is None or isinstance(target, nn.Identity):
        return ""
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return ""


def pair(size) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair; ``()`` when unknown."""
    if size is None:
        return ()
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[-1]))


def cfg_input_size(model: nn.Module) -> tuple[int, int]:
    """The input size in timm's ``pretrained_cfg`` (``(0, 0)`` when absent)."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return (int(size[1]), int(size[2])) if size else (0, 0)


def present(model: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    mods = dict(model.named_modules())
    return tuple(n for n in names if n in mods and not isinstance(mods[n], nn.Identity))


# ---- helpers the builders share --------------------------------------------------------------
def unwrap(module: nn.Module | None, name: str) -> tuple[nn.Module | None, str]:
    """Look through vpeft wrappers: the wrapped module and its qualified name (``....base_layer``)."""
    from ..layers.base import Wrapper

    while isinstance(module, Wrapper):
        module, name = module.base_layer, f"{name}.base_layer"
    return module, name


def child_of(parent: nn.Module | None, prefix: str, attr: str) -> tuple[nn.Module | None, str]:
    return unwrap(getattr(parent, attr, None), f"{prefix}.{attr}")


def linear_name(parent: nn.Module | None, prefix: str, attr: str) -> str:
    module, name = child_of(parent, prefix, attr)
    return name if isinstance(module, nn.Linear) else ""


# ---- timm VisionTransformer ------------------------------------------------------------------
def timm_vit_spec(model: nn.Module) -> ArchSpec:
    # Names resolve through vpeft wrappers, so a second method (composition) finds the real sub-layers.
    parts = []
    for i, outer in enumerate(model.blocks):
        blk, p = unwrap(outer, f"blocks.{i}")
        (attn, a), (mlp, m) = child_of(blk, p, "attn"), child_of(blk, p, "mlp")
        parts.append(
            BlockParts(
                block=f"blocks.{i}",
                norm1=child_of(blk, p, "norm1")[1],
                attn=a,
                qkv=linear_name(attn, a, "qkv"),
                proj=linear_name(attn, a, "proj"),
                norm2=child_of(blk, p, "norm2")[1],
                mlp=m,
                fc1=linear_name(mlp, m, "fc1"),
                fc2=linear_name(mlp, m, "fc2"),
                attention="fused" if _is_timm_attention(attn) else "",
            )
        )
    ps = model.patch_embed.patch_size
    return ArchSpec(
        arch="timm_vit",
        kind="vit",
        blocks=tuple(b.block for b in parts),
        parts=tuple(parts),
        head=module_name(model, model.get_classifier()),
        post_blocks=present(model, ("norm", "fc_norm")),
        stem=present(model, ("patch_embed", "norm_pre")),
        embed_dim=int(model.embed_dim),
        num_prefix_tokens=int(model.num_prefix_tokens),
        patch_size=(int(ps[0]), int(ps[1])),
        image_size=pair(getattr(model.patch_embed, "img_size", None)) or cfg_input_size(model),
        final_norm=child_of(model, "", "norm")[1].lstrip(".")
        if isinstance(getattr(model, "norm", None), nn.Module)
        else "",
        attention=common_attention(parts),
    )


def common_attention(parts) -> str:
    kinds = {p.attention for p in parts}
    return kinds.pop() if len(kinds) == 1 else ""


def _is_timm_attention(attn: nn.Module | None) -> bool:
    from timm.models.vision_transformer import Attention

    return isinstance(attn, Attention) and isinstance(unwrap(getattr(attn, "qkv", None), "")[0], nn.Linear)


# ---- timm EfficientNet / MobileNet-style CNNs ------------------------------------------------
def timm_efficientnet_spec(model: nn.Module) -> ArchSpec:
    blocks = tuple(f"blocks.{s}.{b}" for s, stage in enumerate(model.blocks) for b in range(len(stage)))
    return ArchSpec(
        arch="timm_efficientnet",
        kind="cnn",
        blocks=blocks,
        head=module_name(model, model.get_classifier()),
        post_blocks=present(model, ("conv_head", "bn2")),
        stem=present(model, ("conv_stem", "bn1")),
        embed_dim=int(model.num_features),
        image_size=cfg_input_size(model),
    )


# ---- timm ConvNeXt -----------------------------------------------------------------------------
def timm_convnext_spec(model: nn.Module) -> ArchSpec:
    # Blocks across the four stages; the downsampling layers (LayerNorm2d + 2x2 conv) sit between them.
    blocks = tuple(f"stages.{s}.blocks.{b}" for s, stage in enumerate(model.stages) for b in range(len(stage.blocks)))
    return ArchSpec(
        arch="timm_convnext",
        kind="cnn",
        blocks=blocks,
        head=module_name(model, model.get_classifier()),
        post_blocks=present(model, ("norm_pre", "head.norm")),
        stem=present(model, ("stem",)),
        embed_dim=int(model.num_features),
        image_size=cfg_input_size(model),
    )
