"""The Method contract: what a PEFT method tells vpeft and how it adapts a backbone."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..arch import ArchSpec
from ..config import MethodConfig
from ..errors import UnsupportedBackboneError

__all__ = ["Method", "ADDITION", "SPECIFICATION", "REPARAMETER", "UNIFIED", "FAMILIES"]

ADDITION = "addition"
SPECIFICATION = "partial/specification"
REPARAMETER = "partial/reparameter"
UNIFIED = "unified"
FAMILIES = (ADDITION, SPECIFICATION, REPARAMETER, UNIFIED)

# why methods written for one kind of backbone do not carry over to another
_KIND_NOTES = {
    "swin": " (Swin blocks work on windowed (B, H, W, C) maps whose width changes per stage, with no class or "
    "prefix tokens to prompt or pool)",
    "cnn": " (a CNN has feature maps, no tokens, attention or transformer blocks)",
}


class Method:
    """A PEFT method: a config class plus the way it changes a frozen backbone.

    Subclasses set the class attributes and override :meth:`inject` (add wrappers, return the
    adapted module names) and/or :meth:`select` (name existing parameters to train). vpeft's
    :func:`~vpeft.apply` freezes everything first and then unfreezes exactly: the parameters of
    every injected :class:`~vpeft.layers.Wrapper` (picked by module type), the parameters named
    by :meth:`select`, and the classification head.

    Attributes:
        config_cls: the method's :class:`MethodConfig` subclass (its ``method`` is the registry name).
        family: one of :data:`FAMILIES` (the survey's taxonomy).
        paper: citation of the paper the defaults come from.
        mergeable: the trained delta folds into the base weights (zero inference overhead).
        identity_at_init: the adapted model equals the frozen backbone before training.
        kinds: backbone kinds the method supports (``"vit"``, ``"swin"``, ``"cnn"``; see ArchSpec.kind).
        freeze_norm_stats: keep BatchNorm running statistics frozen (all methods but full tuning).
        saves_buffers: the delta checkpoint also stores buffers (full tuning only).
    """

    config_cls: ClassVar[type[MethodConfig]]
    family: ClassVar[str]
    paper: ClassVar[str]
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("vit", "swin", "cnn")
    freeze_norm_stats: ClassVar[bool] = True
    saves_buffers: ClassVar[bool] = False

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def name(self) -> str:
        return self.config_cls.method

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        """Raise UnsupportedBackboneError if this method cannot adapt ``model``."""
        if spec.kind not in self.kinds:
            raise UnsupportedBackboneError(
                f"method {self.name!r} cannot be applied to {spec.family} ({spec.kind}) backbones; "
                f"it supports {'/'.join(self.kinds)} backbones only{_KIND_NOTES.get(spec.kind, '')}"
            )

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        """Wrap modules in place; return the qualified names of the adapted modules."""
        return []

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        """Names of existing (base) parameters this method trains."""
        return []
