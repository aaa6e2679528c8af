"""Composition: several methods applied together and saved/loaded/merged as one delta.

References: He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022;
Jiang et al., "Rethinking Efficient Tuning Methods from a Unified Perspective" (U-Tuning), 2023.

The sub-methods are injected in order; each one sees the backbone through the wrappers of the ones
before it (the ArchSpec resolves names through wrappers), so e.g. LoRA on q/v + an adapter after the MLP
+ VPT-Deep prompts around every block compose cleanly. Two methods that would wrap the *same* module
(LoRA and DoRA on qkv, Adapter and AdaptFormer on the MLP) conflict and raise :class:`ConfigError` --
the model is left untouched -- unless one of them only transforms the module's output (SSF), which
stacks. The composition is mergeable / identity at init only if every part is.
Default (the example of the unified view): LoRA r=8 on q, v + Pfeiffer adapter (8) + VPT-Deep (10).
ViT-B/16: 294,912 + 156,768 + 92,160 = 543,840 parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..arch import ArchSpec, get_spec
from ..config import MethodConfig
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers import Wrapper
from ..registry import get_method, register_method
from .base import UNIFIED, Method

_DEFAULT = (
    {"method": "lora"},
    {"method": "adapter"},
    {"method": "vpt_deep"},
)


def _as_config(item: MethodConfig | Mapping[str, Any] | str) -> MethodConfig:
    if isinstance(item, MethodConfig):
        return item
    if isinstance(item, str):
        return get_method(item).config_cls()
    if isinstance(item, Mapping):
        return MethodConfig.from_dict(item)
    raise ConfigError(f"compose: {item!r} is not a method config, dict or method name")


@dataclasses.dataclass(frozen=True)
class ComposeConfig(MethodConfig):
    """Composition.

    Attributes:
        methods: the parts, in injection order: method configs, dicts with a ``"method"`` key, or names.
    """

    method = "compose"
    methods: tuple[MethodConfig, ...] = _DEFAULT  # type: ignore[assignment]

    def __post_init__(self) -> None:
        items = (self.methods,) if isinstance(self.methods, (str, Mapping, MethodConfig)) else tuple(self.methods)
        object.__setattr__(self, "methods", tuple(_as_config(m) for m in items))
        super().__post_init__()

    def validate(self) -> None:
        if not self.methods:
            raise ConfigError("compose: methods=[] is invalid; give at least one method")
        nested = [m.method for m in self.methods if isinstance(m, ComposeConfig)]
        if nested:
            raise ConfigError("compose: methods may not contain another 'compose'; list its parts directly")
        if "full" in [m.method for m in self.methods]:
            raise ConfigError("compose: 'full' trains everything already; composing it with other methods is void")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "methods": [m.to_dict() for m in self.methods]}


def _strip(name: str) -> str:
    return name.replace(".base_layer", "")


@register_method
class Compose(Method):
    config_cls = ComposeConfig
    family = UNIFIED
    paper = "He et al., Towards a Unified View of PETL, ICLR 2022; Jiang et al., U-Tuning, 2023"

    def __init__(self, config: ComposeConfig) -> None:
        super().__init__(config)
        self.parts = [get_method(c.method)(c) for c in config.methods]
        self.mergeable = all(p.mergeable for p in self.parts)
        self.identity_at_init = all(p.identity_at_init for p in self.parts)
        self.kinds = tuple(k for k in ("vit", "swin", "cnn") if all(k in p.kinds for p in self.parts))
        self.freeze_norm_stats = all(p.freeze_norm_stats for p in self.parts)
        self.saves_buffers = any(p.saves_buffers for p in self.parts)

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        for part in self.parts:
            try:
                part.check(model, spec)
            except UnsupportedBackboneError as exc:
                raise UnsupportedBackboneError(f"compose: {exc}") from None

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        adapted: list[str] = []
        owner: dict[str, str] = {}
        for part in self.parts:
            before = {id(m) for m in model.modules() if isinstance(m, Wrapper)}
            names = part.inject(model, get_spec(model))
            for name, module in model.named_modules():
                if isinstance(module, Wrapper) and id(module) not in before and not module.stackable:
                    key = _strip(name)
                    if key in owner:
                        raise ConfigError(
                            f"compose: {part.name!r} and {owner[key]!r} both wrap {key}; "
                            "these methods adapt the same module and cannot be composed"
                        )
                    owner[key] = part.name
            adapted += names
        return adapted

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        current = get_spec(model)
        return [n for part in self.parts for n in part.select(model, current)]
