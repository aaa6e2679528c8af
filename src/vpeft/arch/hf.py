"""ArchSpecs of Hugging Face ``transformers`` vision transformers: ViT and CLIP's vision tower.

Supported classes: ``ViTModel`` / ``ViTForImageClassification`` (arch ``hf_vit``) and ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection`` / ``CLIPForImageClassification`` (``hf_clip_vision``). Both are ViTs (kind
``"vit"``): one class token in front of the patch tokens, one width. Unlike timm they have separate q, k, v
Linears (``BlockParts.q/k/v``; LoRA's q/v targets map onto them directly), and their attention module
returns ``(output, weights)``. Module names are resolved for both layouts transformers has used: 5.x
(``layers.N.attention.q_proj/o_proj``, ``mlp.fc1/fc2``) and 4.x (``encoder.layer.N.attention.attention.query``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``, no single MLP module); the tests run
the installed 5.x.

How vpeft treats these models: :func:`vpeft.apply` adapts them in place and they keep their own interface
(``pixel_values`` in, a ``ModelOutput`` out), as PEFT does. Code that needs the logits of any backbone calls
:func:`logits_of` on the output. Nothing here imports ``transformers``: models are recognised by class name
and module, so vpeft works without it installed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedBackboneError
from .family import Family, register_family
from .spec import (
    ArchSpec,
    BlockParts,
    child_of,
    common_attention,
    module_name,
    pair,
    present,
    unwrap,
)

__all__ = ["logits_of", "is_transformers_model"]

VIT_CLASSES = ("ViTModel", "ViTForImageClassification")
CLIP_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPForImageClassification")

# candidate paths inside one encoder layer, newest transformers layout first
_PATHS: dict[str, tuple[str, ...]] = {
    "norm1": ("layernorm_before", "layer_norm1"),
    "attn": ("attention", "self_attn"),
    "norm2": ("layernorm_after", "layer_norm2"),
    "mlp": ("mlp",),
}
_LINEARS: dict[str, tuple[str, ...]] = {
    "q": ("attention.q_proj", "attention.attention.query", "self_attn.q_proj"),
    "k": ("attention.k_proj", "attention.attention.key", "self_attn.k_proj"),
    "v": ("attention.v_proj", "attention.attention.value", "self_attn.v_proj"),
    "proj": ("attention.o_proj", "attention.output.dense", "self_attn.out_proj"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}
_LAYER_LISTS = ("layers", "encoder.layers", "encoder.layer")


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output: the tensor itself (timm) or ``output.logits`` (Hugging Face)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"the model returned a {type(output).__name__} without logits; use a model with a classification "
            "head (e.g. ViTForImageClassification, CLIPForImageClassification)"
        )
    return logits


def is_transformers_model(model: nn.Module, names: Iterable[str] = VIT_CLASSES + CLIP_CLASSES) -> bool:
    """Whether ``model`` is (a subclass of) one of the named ``transformers`` classes."""
    names = tuple(names)
    return any(c.__module__.startswith("transformers.") and c.__name__ in names for c in type(model).__mro__)


def _resolve(block: nn.Module, prefix: str, path: str) -> tuple[nn.Module | None, str]:
    module, name = block, prefix
    for attr in path.split("."):
        module, name = child_of(module, name, attr)
        if module is None:
            return None, ""
    return module, name


def _first(block: nn.Module, prefix: str, paths: tuple[str, ...], linear: bool) -> str:
    for path in paths:
        module, name = _resolve(block, prefix, path)
        if module is not None and (isinstance(module, nn.Linear) or not linear):
            return name
    return ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _tower(model: nn.Module) -> tuple[str, nn.Module, str, nn.ModuleList]:
    """The module holding ``embeddings`` and the encoder layers: its name, itself, the layers' path and list."""
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "embeddings", None), nn.Module):
            continue
        for path in _LAYER_LISTS:
            layers, _ = _resolve(module, name, path)
            if isinstance(layers, nn.ModuleList):
                return name, module, path, layers
    raise UnsupportedBackboneError(f"{type(model).__name__}: no embeddings + encoder layers found")


def _parts(outer: nn.Module, name: str) -> BlockParts:
    blk, p = unwrap(outer, name)
    found = {k: _first(blk, p, paths, linear=False) for k, paths in _PATHS.items()}
    found.update({k: _first(blk, p, paths, linear=True) for k, paths in _LINEARS.items()})
    attn = blk.get_submodule(found["attn"][len(p) + 1 :]) if found["attn"] else None
    return BlockParts(block=name, attention="separate" if _separate_attention(attn, found) else "", **found)


def _separate_attention(attn: nn.Module | None, found: dict[str, str]) -> bool:
    """q, k, v and the output projection are Linears directly under the attention module (transformers 5.x)."""
    if attn is None or not (found["attn"] and all(found[t] for t in ("q", "k", "v", "proj"))):
        return False
    for t in ("q", "k", "v", "proj"):
        name = found[t]
        if not name.startswith(found["attn"] + "."):
            return False
        child, _ = unwrap(getattr(attn, name[len(found["attn"]) + 1 :].split(".")[0], None), "")
        if not isinstance(child, nn.Linear):
            return False
    return hasattr(attn, "head_dim")


def _build(
    model: nn.Module, arch: str, post: tuple[str, ...], root_post: tuple[str, ...] = (), norm: str = ""
) -> ArchSpec:
    """``post``: final modules inside the tower; ``root_post``: ones on the model itself (a projection);
    ``norm``: the tower's final norm over the whole token sequence ("" when none)."""
    tname, tower, path, layers = _tower(model)
    parts = tuple(_parts(layer, _join(tname, f"{path}.{i}")) for i, layer in enumerate(layers))
    cfg = tower.config
    classifier = getattr(model, "classifier", None)
    return ArchSpec(
        arch=arch,
        kind="vit",
        blocks=tuple(p.block for p in parts),
        parts=parts,
        head=module_name(model, classifier) if isinstance(classifier, nn.Linear) else "",
        post_blocks=present(model, tuple(_join(tname, n) for n in post) + root_post),
        stem=present(model, (_join(tname, "embeddings"), _join(tname, "pre_layrnorm"))),
        embed_dim=int(cfg.hidden_size),
        num_prefix_tokens=1,
        patch_size=pair(cfg.patch_size),
        image_size=pair(cfg.image_size),
        final_norm=_first(tower, tname, (norm,), linear=False).lstrip(".") if norm else "",
        attention=common_attention(parts),
    )


def hf_vit_spec(model: nn.Module) -> ArchSpec:
    return _build(model, "hf_vit", ("layernorm", "pooler"), norm="layernorm")


def hf_clip_vision_spec(model: nn.Module) -> ArchSpec:
    # CLIPForImageClassification mean-pools the patch tokens without post_layernorm: that norm is unused there;
    # CLIPVisionModel applies it to the pooled class token only: no norm acts on the whole token sequence
    post = () if is_transformers_model(model, ("CLIPForImageClassification",)) else ("post_layernorm",)
    return _build(model, "hf_clip_vision", post, ("visual_projection",))


class HFVision(Family):
    """Hugging Face vision transformers: ``pixel_values`` in, a ``ModelOutput`` out, the switches of
    ``PreTrainedModel`` (``gradient_checkpointing_enable``)."""

    def __init__(self, name: str, classes: tuple[str, ...], build) -> None:
        self.name, self.classes, self._build = name, classes, build

    def matches(self, model: nn.Module) -> bool:
        return is_transformers_model(model, self.classes)

    def spec(self, model: nn.Module) -> ArchSpec:
        return self._build(model)

    def final_features(self, model: nn.Module, x: torch.Tensor):
        """The tower's ``last_hidden_state`` (position embeddings interpolated for another input size)."""
        stem = self.spec(model).stem
        tower = model.get_submodule(stem[0].rpartition(".")[0] if stem else "")
        config_size = getattr(getattr(tower, "config", None), "image_size", None)
        interpolate = config_size is not None and tuple(x.shape[-2:]) != pair(config_size)
        kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
        return tower(pixel_values=x, **kwargs).last_hidden_state

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()


register_family(HFVision("hf_vit", VIT_CLASSES, hf_vit_spec))
register_family(HFVision("hf_clip_vision", CLIP_CLASSES, hf_clip_vision_spec))
