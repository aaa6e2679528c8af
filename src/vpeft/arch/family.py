"""Backbone families: the one place that knows how a family of backbones is built inside.

A :class:`Family` is registered once in :data:`FAMILIES` and recognises its models (``matches``). Everything the rest
of vpeft needs to know about a backbone goes through it, so no other module tests library classes or attributes:

========================  ==================================================================================
``spec(model)``           where blocks, attention, MLPs, norms, head and tokens are (:class:`ArchSpec`)
``tokens(model, x)``      the token sequence entering the first block (ViT families), with ``token_stem``:
                          the modules it runs; ``finish(model, tokens)``: last block's tokens to the output.
                          The feature cache stores the tokens after a frozen prefix of blocks.
``pre_logits(model, x)``  the vector the classifier reads; ``head(model)``: the classifier (or ``None``)
``final_features``        the deepest dense features (final norm included), for dense prediction
``check_input_size``      a clear error where a backbone was built for one input size only
``set_grad_checkpointing``  recompute the blocks in backward (timm / transformers switches)
``recompute_blocks``      recompute every n-th block of the spec in backward (any family with a spec; exact)
``random_in_training``    whether the family's own layers (drop rates) make training-mode outputs random
========================  ==================================================================================

:func:`get_family` finds the family of a model (the first registered family that matches), :func:`get_spec` its
spec. A new family is one subclass registered with :func:`register_family` (``tests/test_families.py`` registers
one from outside the package and trains it); :func:`register_arch` registers a family from a spec builder alone
(the other capabilities then refuse with the family's name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedBackboneError
from ..registry import Registry
from .recompute import leading_blocks, recompute_blocks
from .spec import ArchSpec, timm_convnext_spec, timm_efficientnet_spec, timm_vit_spec

__all__ = [
    "FAMILIES",
    "Family",
    "TimmFamily",
    "get_family",
    "get_spec",
    "register_arch",
    "register_family",
    "supported_families",
]


class Family:
    """One backbone family (override what the family supports; the defaults refuse with a clear error)."""

    name: str = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def spec(self, model: nn.Module) -> ArchSpec:
        raise NotImplementedError

    # ---- tokens (ViT families): what the feature cache splits at a block boundary -----------------------------
    def tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The token sequence entering the first block for images ``x``."""
        raise self._refuse("running the blocks one by one")

    def token_stem(self, model: nn.Module) -> Sequence[nn.Module]:
        """The modules :meth:`tokens` runs (besides the root's own tensors); ``()`` where it is unsupported."""
        return ()

    def finish(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The model's output from the last block's tokens (final norm, pooling, head)."""
        raise self._refuse("running the blocks one by one")

    # ---- classification -----------------------------------------------------------------------------------
    def pre_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The features the classifier reads."""
        raise self._refuse("pre-logit features")

    def head(self, model: nn.Module) -> nn.Module | None:
        """The classifier module (``None``: the model has none)."""
        name = self.spec(model).head
        return model.get_submodule(name) if name else None

    # ---- dense prediction ---------------------------------------------------------------------------------
    def final_features(self, model: nn.Module, x: torch.Tensor):
        """The deepest features (tokens or a map), final norm included."""
        raise self._refuse("dense features")

    def check_input_size(self, model: nn.Module, size: tuple[int, int]) -> None:
        """Raise a clear :class:`ConfigError` where the backbone cannot take ``size`` ``(H, W)`` inputs."""

    # ---- training options ---------------------------------------------------------------------------------
    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        """Recompute the blocks' activations in backward instead of keeping them."""
        raise ConfigError(
            f"gradient checkpointing is not supported on {type(model).__name__} (backbone family {self.name!r}); "
            "train without grad_checkpointing"
        )

    def recompute_blocks(self, model: nn.Module, every: int = 1, fraction: float = 1.0) -> list[str]:
        """Recompute every ``every``-th block of :meth:`spec` in backward (non-reentrant checkpointing around the
        block: its parameters, names and the methods' wrappers inside it unchanged); with ``fraction < 1`` only
        among the first ``ceil(fraction * blocks)`` (:func:`~vpeft.arch.recompute.leading_blocks`). Returns the
        blocks' names. Losses and gradients are bit-identical to the default (:mod:`vpeft.arch.recompute`)."""
        blocks = self.spec(model).blocks
        if not blocks:
            raise ConfigError(f"backbone family {self.name!r} lists no blocks for {type(model).__name__} to recompute")
        return recompute_blocks(model, leading_blocks(blocks, fraction), every)

    def random_in_training(self, model: nn.Module) -> bool:
        """Whether the family's own training-time randomness (a dropout rate set on the model) is active."""
        return False

    def _refuse(self, what: str) -> UnsupportedBackboneError:
        return UnsupportedBackboneError(f"backbone family {self.name!r} does not support {what}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


FAMILIES: Registry[Family] = Registry("backbone family")


def register_family(family: Family) -> Family:
    """Register ``family`` under ``family.name`` (families are tried in registration order)."""
    if not isinstance(family, Family):
        raise ConfigError(f"register_family needs a Family instance, got {type(family).__name__}")
    return FAMILIES.register(family.name, family)


def get_family(model: nn.Module) -> Family:
    """The family of ``model``; an unsupported architecture raises :class:`UnsupportedBackboneError`."""
    for _, family in FAMILIES.items():
        if family.matches(model):
            return family
    raise UnsupportedBackboneError(
        f"backbone class {type(model).__name__!r} is not supported; "
        f"supported families: {', '.join(supported_families())}"
    )


def supported_families() -> list[str]:
    """The registered family names, in the order they are tried."""
    return [name for name, _ in FAMILIES.items()]


def get_spec(model: nn.Module) -> ArchSpec:
    """Return the ArchSpec of ``model``; unsupported architectures raise UnsupportedBackboneError."""
    return get_family(model).spec(model)


class _SpecOnly(Family):
    def __init__(self, name: str, matches: Callable[[nn.Module], bool], build: Callable[[nn.Module], ArchSpec]):
        self.name, self._matches, self._build = name, matches, build

    def matches(self, model: nn.Module) -> bool:
        return bool(self._matches(model))

    def spec(self, model: nn.Module) -> ArchSpec:
        return self._build(model)


def register_arch(
    arch: str, matches: Callable[[nn.Module], bool]
) -> Callable[[Callable[[nn.Module], ArchSpec]], Callable[[nn.Module], ArchSpec]]:
    """Register a family known by its spec builder only (``matches(model)`` recognises its models)."""

    def deco(build: Callable[[nn.Module], ArchSpec]) -> Callable[[nn.Module], ArchSpec]:
        register_family(_SpecOnly(arch, matches, build))
        return build

    return deco


# ---- timm -------------------------------------------------------------------------------------------------------
class TimmFamily(Family):
    """What every timm model offers: ``forward_features`` / ``forward_head``, ``get_classifier``,
    ``set_grad_checkpointing`` and ``drop_rate``. Subclasses give ``model_class`` (a ``timm.models`` path)."""

    model_class: str = ""  # "module:Class" under timm.models

    def __init__(self, build: Callable[[nn.Module], ArchSpec]) -> None:
        self._build = build

    def _cls(self) -> type | None:
        module, _, name = self.model_class.partition(":")
        try:
            mod = __import__(f"timm.models.{module}", fromlist=[name])
        except ImportError:  # pragma: no cover - timm is a dependency
            return None
        return getattr(mod, name, None)

    def matches(self, model: nn.Module) -> bool:
        cls = self._cls()
        return cls is not None and isinstance(model, cls)

    def spec(self, model: nn.Module) -> ArchSpec:
        return self._build(model)

    def pre_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    def head(self, model: nn.Module) -> nn.Module | None:
        head = model.get_classifier()
        return None if isinstance(head, nn.Identity) else head

    def final_features(self, model: nn.Module, x: torch.Tensor):
        return model.forward_features(x)

    def check_input_size(self, model: nn.Module, size: tuple[int, int]) -> None:
        embed = getattr(model, "patch_embed", None)
        built = getattr(embed, "img_size", None)
        if built is None or not getattr(embed, "strict_img_size", False) or getattr(model, "dynamic_img_size", False):
            return
        if tuple(built) != tuple(size):
            raise ConfigError(
                f"the backbone was built for {built[0]}x{built[1]} inputs, got {size[0]}x{size[1]}; build it with "
                f"img_size=({size[0]}, {size[1]}) or dynamic_img_size=True (timm) to run at that size"
            )

    def set_grad_checkpointing(self, model: nn.Module, enable: bool = True) -> None:
        model.set_grad_checkpointing(enable)

    def random_in_training(self, model: nn.Module) -> bool:
        return bool(getattr(model, "drop_rate", 0.0))


class TimmViT(TimmFamily):
    """timm ``VisionTransformer``: the token embedding is written here on its public modules (bit-exact with
    timm's own forward, checked in ``tests/test_families.py``)."""

    name, model_class = "timm_vit", "vision_transformer:VisionTransformer"

    def tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        if model.pos_embed is None:
            x = torch.cat([*prefix, x.view(x.shape[0], -1, x.shape[-1])], dim=1)
        else:
            pos = model.pos_embed
            if model.dynamic_img_size:
                from timm.layers import resample_abs_pos_embed

                b, h, w, c = x.shape
                pos = resample_abs_pos_embed(
                    pos,
                    new_size=(h, w),
                    old_size=model.patch_embed.grid_size,
                    num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens,
                )
                x = x.view(b, -1, c)
            if model.no_embed_class:
                x = x + pos
                x = torch.cat([*prefix, x], dim=1) if prefix else x
            else:
                x = torch.cat([*prefix, x], dim=1) if prefix else x
                x = x + pos
            x = model.pos_drop(x)
        return model.norm_pre(model.patch_drop(x))

    def token_stem(self, model: nn.Module) -> Sequence[nn.Module]:
        return (model.patch_embed, model.pos_drop, model.patch_drop, model.norm_pre)

    def finish(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(tokens))


class TimmEfficientNet(TimmFamily):
    name, model_class = "timm_efficientnet", "efficientnet:EfficientNet"


class TimmConvNeXt(TimmFamily):
    name, model_class = "timm_convnext", "convnext:ConvNeXt"


register_family(TimmViT(timm_vit_spec))
register_family(TimmEfficientNet(timm_efficientnet_spec))
register_family(TimmConvNeXt(timm_convnext_spec))
