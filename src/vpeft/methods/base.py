"""The Method contract: what a PEFT method tells vpeft and how it adapts a backbone."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .._modules import set_module
from ..arch import ArchSpec, Target, resolve
from ..config import MethodConfig
from ..errors import UnsupportedBackboneError
from ..layers.temporal import num_frames_of

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

    Subclasses set the class attributes and either name the *roles* they adapt (:attr:`roles`, or
    :meth:`target_roles` when the config chooses them) and build one wrapper per resolved target in
    :meth:`create` -- the base class resolves the roles through the ArchSpec (fused q/k/v slices or separate
    projections, decided there once), refuses a backbone lacking a role with an UnsupportedBackboneError naming
    the role, the block and the backbone, and replaces the modules (the template loop of :meth:`inject`, as
    PEFT's ``BaseTuner._create_and_replace``) -- or override :meth:`inject` wholesale; and/or override
    :meth:`select` (name existing parameters to train). vpeft's
    :func:`~vpeft.apply` freezes everything first and then unfreezes exactly: the parameters of
    every injected :class:`~vpeft.layers.Wrapper` (picked by module type), the parameters named
    by :meth:`select`, and the classification head.

    Attributes:
        config_cls: the method's :class:`MethodConfig` subclass (its ``method`` is the registry name).
        family: one of :data:`FAMILIES` (the survey's taxonomy).
        paper: citation of the paper the defaults come from.
        title: the method's name as its paper writes it, for tables (``""``: the registry name; the built-in
            methods' titles are listed in :data:`vpeft.bench.labels.METHOD_TITLES`).
        mergeable: the trained delta folds into the base weights (zero inference overhead).
        identity_at_init: the adapted model equals the frozen backbone before training.
        kinds: backbone kinds the method supports (``"vit"``, ``"swin"``, ``"cnn"``; see ArchSpec.kind).
        towers: on a two-tower CLIP, the towers it trains in (``"image"``, ``"text"``).
        inputs: what the adapted backbone sees: ``"image"`` (single images: classification, segmentation ...)
            and/or ``"video"`` (a video task's clips, run frame-wise: :mod:`vpeft.layers.temporal`). Image methods
            act on each frame and take both; temporal methods (AIM, ST-Adapter, ZeroI2V) need ``T`` and take
            ``("video",)`` only.
        freeze_norm_stats: keep BatchNorm running statistics frozen (all methods but full tuning).
        saves_buffers: the delta checkpoint also stores buffers (full tuning only).
        roles: the roles the template loop adapts in every block (see :mod:`vpeft.arch.targets`).
    """

    config_cls: ClassVar[type[MethodConfig]]
    family: ClassVar[str]
    paper: ClassVar[str]
    title: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("vit", "swin", "cnn")
    #: the towers of a two-tower CLIP the method trains in (a vision method adapts the image tower)
    towers: ClassVar[tuple[str, ...]] = ("image",)
    #: the inputs it adapts a backbone for (a video-only method refuses an image backbone)
    inputs: ClassVar[tuple[str, ...]] = ("image", "video")
    freeze_norm_stats: ClassVar[bool] = True
    saves_buffers: ClassVar[bool] = False
    roles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def name(self) -> str:
        return self.config_cls.method

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        """Raise UnsupportedBackboneError if this method cannot adapt ``model``."""
        if "image" not in self.inputs and num_frames_of(model) is None:
            raise UnsupportedBackboneError(
                f"method {self.name!r} models time across the frames of a clip and adapts video backbones only; "
                "this backbone is built for an image task (build it for a video task: "
                "vpeft.tasks.VideoTask(...).build(backbone), or vpeft train on a video folder)"
            )
        if spec.kind not in self.kinds:
            raise UnsupportedBackboneError(
                f"method {self.name!r} cannot be applied to {spec.arch} ({spec.kind}) backbones; "
                f"it supports {'/'.join(self.kinds)} backbones only{_KIND_NOTES.get(spec.kind, '')}"
            )
        if self.target_roles(spec):
            targets = self.targets(model, spec)
            for target in targets:
                self.check_target(model, spec, target)
            self.check_targets(model, spec, targets)

    # ---- the template injection loop ----------------------------------------------------------------------------
    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        """The roles to adapt on this backbone (default: :attr:`roles`; configs with ``targets`` override)."""
        return self.roles

    def targets(self, model: nn.Module, spec: ArchSpec) -> list[Target]:
        """The resolved targets of :meth:`target_roles`; a missing role raises UnsupportedBackboneError."""
        return resolve(model, spec, self.target_roles(spec), method=self.name)

    def check_target(self, model: nn.Module, spec: ArchSpec, target: Target) -> None:
        """Raise UnsupportedBackboneError / ConfigError if ``target`` cannot be adapted (called before injecting)."""

    def check_targets(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        """Checks over all targets together (e.g. the number of per-layer codes)."""

    def prepare(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        """Called once before :meth:`create` runs on ``targets`` (e.g. to build tensors they share)."""

    def finish(self, model: nn.Module, spec: ArchSpec, adapted: list[str]) -> list[str]:
        """Called once after the loop with the adapted names; returns the names :meth:`inject` reports."""
        return adapted

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module | None:
        """The module replacing ``target.module`` (usually a Wrapper over it); None leaves it as it is."""
        raise NotImplementedError(f"{type(self).__name__} names roles but implements no create()")

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        """Wrap modules in place; return the qualified names of the adapted modules.

        The default runs :meth:`create` on every target of :meth:`target_roles` (none: nothing is injected).
        """
        if not self.target_roles(spec):
            return []
        targets, adapted = self.targets(model, spec), []
        self.prepare(model, spec, targets)
        for target in targets:
            module = self.create(model, spec, target)
            if module is not None:
                set_module(model, target.name, module)
                adapted.append(target.name)
        return self.finish(model, spec, adapted)

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        """Names of existing (base) parameters this method trains."""
        return []
