"""Any vpeft method on either tower of a two-tower backbone (CLIP): tower-qualified targets.

A method applies to a tower by injecting into the tower's sub-module with that tower's own ArchSpec
(:mod:`vpeft.arch.clip`), exactly as it would on a stand-alone ViT; the parent model lists its towers in
``vpeft_towers`` (``{"image": "image", "text": "text"}`` on :class:`~vpeft.backbones.clip.ClipBackbone`).

Configs: ``TowersConfig(image=LoRAConfig(targets=("q", "v")), text=BitFitConfig())``, or from tower-qualified
targets with :func:`per_tower`: ``per_tower("lora", ["image.q", "image.v", "text.q"], r=4)`` (a method without
targets names the bare tower: ``per_tower("bitfit", ["text"])``). An unknown tower is a one-line ConfigError.

The text tower takes only methods that keep the token layout (its causal mask and end-of-text pooling are fixed):
those listed in :data:`TEXT_SAFE`; prompt methods for the text tower are CoOp / CoCoOp / MaPLe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..arch import ArchSpec, get_spec
from ..arch.clip import is_clip_spec
from ..config import MethodConfig
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers import Wrapper
from ..registry import get_method, register_method
from .base import UNIFIED, Method
from .lora import LoRAConfig

__all__ = [
    "check_clip",
    "TowersConfig",
    "Towers",
    "per_tower",
    "split_targets",
    "TOWERS",
    "TEXT_SAFE",
    "inject_tower",
    "CLIP_METHODS",
]


def check_clip(method: Method, model: nn.Module, spec: ArchSpec, slot: str = "prompt") -> None:
    """Raise unless ``model`` is a two-tower CLIP whose ``slot`` is free."""
    if not is_clip_spec(spec):
        raise UnsupportedBackboneError(
            f"{method.name} learns CLIP prompts and needs a two-tower CLIP backbone (vpeft.backbones.clip.create); "
            f"{spec.arch} has no text tower"
        )
    current = getattr(model, slot)
    if isinstance(current, Wrapper):
        raise ConfigError(f"{method.name}: the backbone's {slot} slot already holds {type(current).__name__}")


TOWERS = ("image", "text")
#: registered methods that need a two-tower CLIP backbone (their ViT-B/16 counts: tests/test_clip_counts.py)
CLIP_METHODS = ("coop", "cocoop", "maple", "clip_lora", "clip_adapter", "towers")
#: methods that only change Linears, norms or sub-layer outputs (never the token sequence): valid on a text tower
TEXT_SAFE = (
    "lora",
    "dora",
    "adapter",
    "adaptformer",
    "bitfit",
    "ssf",
    "ia3",
    "ln_tune",
    "attention_only",
    "difffit",
    "fact_tt",
    "fact_tk",
    "krona",
    "glora",
    "repadapter",
    "partial",
    "full",
)


def split_targets(targets: Sequence[str], method: str = "towers") -> dict[str, tuple[str, ...]]:
    """``["image.q", "text.v", "text"]`` -> ``{"image": ("q",), "text": ("v",)}`` (a bare tower: no targets)."""
    out: dict[str, list[str]] = {}
    for target in (targets,) if isinstance(targets, str) else targets:
        tower, _, role = str(target).partition(".")
        if tower not in TOWERS:
            raise ConfigError(
                f"{method}: target {target!r} names unknown tower {tower!r}; valid towers: {', '.join(TOWERS)} "
                "(write targets as <tower>.<role>, e.g. image.q, text.v)"
            )
        out.setdefault(tower, [])
        if role:
            out[tower].append(role)
    return {k: tuple(v) for k, v in out.items()}


def _as_config(value: Any, tower: str) -> MethodConfig | None:
    if value is None or isinstance(value, MethodConfig):
        return value
    if isinstance(value, str):
        return get_method(value).config_cls()
    if isinstance(value, Mapping):
        return MethodConfig.from_dict(value)
    raise ConfigError(f"towers: {tower}={value!r} is invalid; give a method config, a dict or a method name")


@dataclasses.dataclass(frozen=True)
class TowersConfig(MethodConfig):
    """One method config per tower.

    Attributes:
        image: the method for the image tower (None: untouched); default LoRA r = 8 on q, v.
        text: the method for the text tower (None: untouched); one of :data:`TEXT_SAFE`; default LoRA r = 8 on q, v.
    """

    method = "towers"
    image: MethodConfig | None = LoRAConfig()
    text: MethodConfig | None = LoRAConfig()

    def __post_init__(self) -> None:
        for tower in TOWERS:
            object.__setattr__(self, tower, _as_config(getattr(self, tower), tower))
        super().__post_init__()

    def validate(self) -> None:
        parts = {t: getattr(self, t) for t in TOWERS if getattr(self, t) is not None}
        if not parts:
            raise ConfigError(f"towers: no method given; set image= and/or text= (towers: {', '.join(TOWERS)})")
        bad = [c.method for c in parts.values() if c.method == "towers"]
        if bad:
            raise ConfigError("towers: a tower's method may not be 'towers' itself")
        if self.text is not None and self.text.method not in TEXT_SAFE:
            raise ConfigError(
                f"towers: {self.text.method!r} changes the token sequence and cannot adapt the text tower (causal "
                f"mask, end-of-text pooling); valid text-tower methods: {', '.join(TEXT_SAFE)}; for text prompts "
                "use coop, cocoop or maple"
            )

    def parts(self) -> dict[str, MethodConfig]:
        return {t: getattr(self, t) for t in TOWERS if getattr(self, t) is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            **{t: (c.to_dict() if c else None) for t, c in zip(TOWERS, (self.image, self.text))},
        }


def per_tower(method: str, targets: Sequence[str], **options: Any) -> TowersConfig:
    """A :class:`TowersConfig` applying ``method`` (with ``options``) to the towers named in tower-qualified
    ``targets`` (``"image.q"``, ``"text.v"``; a bare ``"text"`` for methods without targets)."""
    cls = get_method(method).config_cls
    per = {}
    for tower, roles in split_targets(targets, method).items():
        kwargs = dict(options)
        if roles:
            if "targets" not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"{method}: has no targets; name the bare tower ({tower!r}) instead of {roles}")
            kwargs["targets"] = roles
        per[tower] = cls.from_kwargs(kwargs)
    return TowersConfig(**{t: per.get(t) for t in TOWERS})


def tower_module(model: nn.Module, tower: str, method: str) -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of ``tower`` in ``model``; an image-only backbone raises."""
    towers = getattr(model, "vpeft_towers", None)
    if not towers:
        raise UnsupportedBackboneError(
            f"{method}: {type(model).__name__} has no towers (an image-only backbone); tower-qualified methods need "
            "a two-tower CLIP (vpeft.backbones.clip.create)"
        )
    if tower not in towers:
        raise ConfigError(f"{method}: unknown tower {tower!r}; valid towers: {', '.join(towers)}")
    return towers[tower], model.get_submodule(towers[tower])


def inject_tower(model: nn.Module, tower: str, method: Method, name: str) -> list[str]:
    """Check and inject ``method`` into ``model``'s ``tower`` with that tower's ArchSpec; parent-qualified names."""
    path, sub = tower_module(model, tower, name)
    spec = get_spec(sub)
    try:
        method.check(sub, spec)
    except UnsupportedBackboneError as exc:
        raise UnsupportedBackboneError(f"{name} ({tower} tower): {exc}") from None
    return [f"{path}.{n}" for n in method.inject(sub, spec)]


@register_method
class Towers(Method):
    config_cls = TowersConfig
    family = UNIFIED
    paper = "vpeft: a method per tower of a two-tower model (Radford et al., CLIP, ICML 2021)"
    kinds = ("vit",)
    towers = ("image", "text")

    def __init__(self, config: TowersConfig) -> None:
        super().__init__(config)
        self.parts = {t: get_method(c.method)(c) for t, c in config.parts().items()}
        self.mergeable = all(p.mergeable for p in self.parts.values())
        self.identity_at_init = all(p.identity_at_init for p in self.parts.values())

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        for tower, part in self.parts.items():
            _, sub = tower_module(model, tower, self.name)
            try:
                part.check(sub, get_spec(sub))
            except UnsupportedBackboneError as exc:
                raise UnsupportedBackboneError(f"towers ({tower} tower): {exc}") from None

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        return [n for tower, part in self.parts.items() for n in inject_tower(model, tower, part, self.name)]

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        names = []
        for tower, part in self.parts.items():
            path, sub = tower_module(model, tower, self.name)
            names += [f"{path}.{n}" for n in part.select(sub, get_spec(sub))]
        return names
