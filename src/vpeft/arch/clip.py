"""ArchSpecs of CLIP towers (open_clip and Hugging Face) and of :class:`vpeft.backbones.clip.ClipBackbone`.

Families:

* ``open_clip_vision``: open_clip's ``VisionTransformer`` (blocks ``transformer.resblocks.N``: ``ln_1``, ``attn``
  with a Linear ``qkv`` -- see :class:`~vpeft.backbones.clip.FusedSelfAttention` -- and ``out_proj``, ``ln_2``,
  ``mlp.c_fc`` / ``mlp.c_proj``); stem ``conv1``, ``ln_pre``; post ``ln_post``.
* ``open_clip_text``: :class:`~vpeft.backbones.clip.OpenClipTextTower` (same blocks; stem ``token_embedding``;
  post ``ln_final``). Kind ``"vit"`` with no patch grid: Linear/norm/MLP-level methods apply; methods that insert
  tokens are refused on a text tower by :mod:`vpeft.methods.towers` (causal mask, end-of-text pooling).
* ``hf_clip_text``: ``transformers`` ``CLIPTextModel`` (``encoder.layers.N.self_attn.q_proj/k_proj/v_proj``).
  Hugging Face's ``CLIPVisionModel`` is ``hf_clip_vision`` (:mod:`vpeft.arch.hf`).
  Attention kind ``""`` on the open_clip towers and the text towers: methods that recompute attention with extra
  keys/values (prefix tuning, E2VPT) refuse them.
* ``open_clip`` / ``hf_clip``: a whole :class:`~vpeft.backbones.clip.ClipBackbone`; its spec is its image tower's,
  names under ``image.`` (a method named without a tower adapts the image tower, as on a ``CLIPVisionModel``).
  The towers themselves are listed in ``ClipBackbone.vpeft_towers``.

Library models are recognised by class name and module, so nothing here imports open_clip or transformers; the
families of vpeft's own CLIP classes (``open_clip_text``, ``clip``) are registered beside those classes, in
:mod:`vpeft.backbones.clip`, from the spec builders here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.base import Wrapper
from .family import Family, get_spec, register_arch, register_family
from .spec import ArchSpec, BlockParts

__all__ = ["CLIP_FAMILIES", "clip_backbone_spec", "is_clip_spec", "open_clip_text_spec", "prefixed"]

CLIP_FAMILIES = ("open_clip", "hf_clip")


def is_clip_spec(spec: ArchSpec) -> bool:
    """Whether ``spec`` describes a whole two-tower CLIP backbone."""
    return spec.arch in CLIP_FAMILIES


def _is(model: nn.Module, module_prefix: str, names: tuple[str, ...]) -> bool:
    return any(c.__module__.startswith(module_prefix) and c.__name__ in names for c in type(model).__mro__)


def _resolve(root: nn.Module, path: str, linear: bool = False) -> str:
    """Qualified name of ``path`` in ``root`` looking through vpeft wrappers (``""``: absent, or not a Linear)."""
    module, name = root, ""
    for attr in path.split("."):
        while isinstance(module, Wrapper):
            module, name = module.base_layer, f"{name}.base_layer" if name else "base_layer"
        module = getattr(module, attr, None)
        name = f"{name}.{attr}" if name else attr
        if module is None:
            return ""
    while isinstance(module, Wrapper):
        module, name = module.base_layer, f"{name}.base_layer"
    if linear and not isinstance(module, nn.Linear):
        return ""
    return name


_OPEN_CLIP = {"norm1": "ln_1", "attn": "attn", "norm2": "ln_2", "mlp": "mlp"}
_OPEN_CLIP_LIN = {"qkv": "attn.qkv", "proj": "attn.out_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
_HF = {"norm1": "layer_norm1", "attn": "self_attn", "norm2": "layer_norm2", "mlp": "mlp"}
_HF_LIN = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "proj": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def _blocks(model: nn.Module, path: str, plain: dict[str, str], linear: dict[str, str]) -> tuple[BlockParts, ...]:
    layers = model.get_submodule(path)
    parts = []
    for i in range(len(layers)):
        name = f"{path}.{i}"
        found = {k: _resolve(model, f"{name}.{p}") for k, p in plain.items()}
        found.update({k: _resolve(model, f"{name}.{p}", linear=True) for k, p in linear.items()})
        parts.append(BlockParts(block=name, **found))
    return tuple(parts)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def open_clip_vision_spec(model: nn.Module) -> ArchSpec:
    parts = _blocks(model, "transformer.resblocks", _OPEN_CLIP, _OPEN_CLIP_LIN)
    return ArchSpec(
        arch="open_clip_vision",
        kind="vit",
        blocks=tuple(p.block for p in parts),
        parts=parts,
        head="",
        post_blocks=("ln_post",),
        final_norm="ln_post",
        stem=("conv1", "ln_pre"),
        embed_dim=int(model.transformer.width),
        num_prefix_tokens=1,
        patch_size=_pair(model.patch_size),
        image_size=_pair(model.image_size),
    )


class OpenClipVision(Family):
    """open_clip's ``VisionTransformer``: its token embedding and pooling written here on its public modules
    (bit-exact with open_clip's own ``forward``, checked in ``tests/test_families.py``). Attention pooling
    (CoCa) is not supported."""

    name = "open_clip_vision"

    def matches(self, model: nn.Module) -> bool:
        return _is(model, "open_clip", ("VisionTransformer",))

    def spec(self, model: nn.Module) -> ArchSpec:
        return open_clip_vision_spec(model)

    def tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid**2, width)
        cls = model.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + model.positional_embedding.to(x.dtype)
        return model.ln_pre(model.patch_dropout(x))

    def token_stem(self, model: nn.Module):
        return (model.conv1, model.patch_dropout, model.ln_pre)

    def finish(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled (class token or mean of the patch tokens), normalised and projected image features."""
        if getattr(model, "attn_pool", None) is not None:
            raise ConfigError("open_clip attention pooling (CoCa) is not supported; use a CLIP ViT")
        pool = getattr(model, "pool_type", "tok")
        after = bool(getattr(model, "final_ln_after_pool", False))
        x = tokens if after else model.ln_post(tokens)
        pooled = x[:, 1:].mean(dim=1) if pool == "avg" else x[:, 0] if pool == "tok" else x
        if after:
            pooled = model.ln_post(pooled)
        return pooled @ model.proj if model.proj is not None else pooled

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        model.set_grad_checkpointing(enable)


register_family(OpenClipVision())


def open_clip_text_spec(model: nn.Module) -> ArchSpec:
    """The spec of :class:`~vpeft.backbones.clip.OpenClipTextTower` (its family is registered by
    :mod:`vpeft.backbones.clip`, which defines the class)."""
    parts = _blocks(model, "transformer.resblocks", _OPEN_CLIP, _OPEN_CLIP_LIN)
    return ArchSpec(
        arch="open_clip_text",
        kind="vit",
        blocks=tuple(p.block for p in parts),
        parts=parts,
        head="",
        post_blocks=("ln_final",),
        final_norm="ln_final",
        stem=("token_embedding",),
        embed_dim=int(model.transformer.width),
        num_prefix_tokens=1,
    )


@register_arch("hf_clip_text", lambda m: _is(m, "transformers.", ("CLIPTextModel", "CLIPTextModelWithProjection")))
def _hf_clip_text(model: nn.Module) -> ArchSpec:
    tower = "text_model." if hasattr(model, "text_model") else ""
    parts = _blocks(model, f"{tower}encoder.layers", _HF, _HF_LIN)
    return ArchSpec(
        arch="hf_clip_text",
        kind="vit",
        blocks=tuple(p.block for p in parts),
        parts=parts,
        head="",
        post_blocks=(f"{tower}final_layer_norm",),
        final_norm=f"{tower}final_layer_norm",
        stem=(f"{tower}embeddings",),
        embed_dim=int(model.config.hidden_size),
        num_prefix_tokens=1,
    )


def prefixed(spec: ArchSpec, prefix: str, arch: str | None = None) -> ArchSpec:
    """``spec`` of a sub-module named ``prefix``, re-expressed with names from the parent model."""

    def q(name: str) -> str:
        return f"{prefix}.{name}" if name else ""

    names = [f.name for f in dataclasses.fields(BlockParts) if f.name != "attention"]  # attention: a kind, no name
    parts = tuple(dataclasses.replace(p, **{n: q(getattr(p, n)) for n in names}) for p in spec.parts)
    return dataclasses.replace(
        spec,
        arch=arch or spec.arch,
        blocks=tuple(q(b) for b in spec.blocks),
        parts=parts,
        head=q(spec.head),
        post_blocks=tuple(q(n) for n in spec.post_blocks),
        stem=tuple(q(n) for n in spec.stem),
        final_norm=q(spec.final_norm),
    )


def clip_backbone_spec(model: nn.Module) -> ArchSpec:
    """The spec of a whole :class:`~vpeft.backbones.clip.ClipBackbone`: its image tower's, names under ``image.``
    (its family is registered by :mod:`vpeft.backbones.clip`)."""
    arch = "open_clip" if model.source == "open_clip" else "hf_clip"
    return prefixed(get_spec(model.image), "image", arch)
