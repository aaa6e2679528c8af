"""GLoRA: generalised LoRA with a per-layer choice of support tensors.

Reference: Chavan et al., "One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning", 2023; official
code Arnav0400/ViT-Slim (``GLoRA/``). Every Linear of every block -- the fused ``qkv`` (one layer, as in the
official code, which wraps every ``nn.Linear`` but the head), ``proj``, ``fc1``, ``fc2`` -- becomes
``W' = W0 + W0*A + B``, ``b' = b0 + b0*D + E + W0 C`` (see :mod:`vpeft.layers.glora` for the forms of A..E and
the five-letter layer codes). Identity at initialisation; merges into the weights (zero inference cost).

The paper picks each layer's forms by an evolutionary search over a supernet (``vpeft search --space glora``,
:mod:`vpeft.search`); the search exports its result as this config with one code per layer in ``layers``.
Without ``layers`` every layer uses the uniform choice ``A``..``E``. The default is the official supernet's
largest path (every tensor at its largest form, rank 4 = the official default rank) except ``D = none``: ``D`` scales
the base bias, so it is dead (zero gradient) wherever that bias is zero, e.g. in freshly initialised timm models.
ViT-B/16 default: per block qkv 4*(2304+768)*2 + 4*769 + 2304, proj 4*(768+768)*2 + 4*769 + 768,
fc1 4*(3072+768)*2 + 4*769 + 3072, fc2 4*(768+3072)*2 + 4*3073 + 768 = 126,736; x 12 = 1,520,832 parameters
(the paper reports searched subnets of 0.29M-0.86M only, no fixed setting).

Separate q, k, v projections (Hugging Face): target ``qkv`` is the three projections, each its own GLoRA layer
(so its own code in ``layers``: 6 layers per block with the default targets; a per-target code applies to all
three) -- what the official code, which wraps every ``nn.Linear``, does on such a model. Counts differ from the
fused layout (each projection has its own low-rank factors).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .._modules import get_module
from ..arch import ArchSpec, Target, target_names
from ..config import MethodConfig, check_choice, check_int, check_subset
from ..errors import ConfigError
from ..layers.glora import OPTIONS, TENSORS, GLoRALinear, glora_params, make_code, parse_code
from ..registry import register_method
from .base import REPARAMETER, Method

TARGETS = ("qkv", "proj", "fc1", "fc2")

__all__ = ["GLoRAConfig", "GLoRA", "TARGETS", "layer_names", "layer_codes", "glora_param_count"]


@dataclasses.dataclass(frozen=True)
class GLoRAConfig(MethodConfig):
    """GLoRA.

    Attributes:
        r: rank of the ``lora`` forms (>= 1).
        A, B: form of the weight scaling / weight shift: lora, vector, scalar or none.
        C: form of the bias prompt ``W0 C``: lora, vector or none.
        D, E: form of the bias scaling / bias shift: vector, scalar or none.
        targets: Linear layers of every block to adapt: any of qkv (the fused projection as one layer),
            proj, fc1, fc2; layers are ordered block by block, in this canonical order within a block.
        layers: per-layer codes (five letters over A..E from L/V/S/N, e.g. ``"LVNSV"``) overriding A..E.
            Its length is 1 (every layer), ``len(targets)`` (one code per target, repeated in every block)
            or ``depth * len(targets)`` (one per layer); other lengths are refused when the model is adapted.
    """

    method = "glora"
    r: int = 4
    A: str = "lora"
    B: str = "lora"
    C: str = "lora"
    D: str = "none"
    E: str = "vector"
    targets: tuple[str, ...] = TARGETS
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("targets", "layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
        object.__setattr__(self, "layers", tuple(str(c).upper() for c in self.layers))
        super().__post_init__()

    def validate(self) -> None:
        check_int(self, "r", 1)
        for t in TENSORS:
            check_choice(self, t, OPTIONS[t])
        check_subset(self, "targets", TARGETS)
        for i, code in enumerate(self.layers):
            try:
                parse_code(code)
            except ValueError as exc:
                raise ConfigError(f"glora: layers[{i}]: {exc}") from None

    @property
    def uniform_code(self) -> str:
        return make_code({t: getattr(self, t) for t in TENSORS})


def layer_names(spec: ArchSpec, targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Qualified names of the adapted Linears, block by block, in the canonical target order.

    ``qkv`` is one layer where it is fused (timm) and the three separate projections elsewhere (Hugging Face).
    """
    return [name for _, name in target_names(spec, targets, method="glora")]


def layer_codes(cfg: GLoRAConfig, spec: ArchSpec) -> list[str]:
    """One code per adapted layer (block by block), broadcasting a short ``layers`` tuple."""
    roles = [role for role, _ in target_names(spec, cfg.targets, method="glora")]
    per_target = [t for t in TARGETS if t in cfg.targets]
    codes = cfg.layers or (cfg.uniform_code,)
    if len(codes) == 1:
        return list(codes) * len(roles)
    if len(codes) == len(per_target):
        return [codes[per_target.index(role)] for role in roles]
    if len(codes) == len(roles):
        return list(codes)
    raise ConfigError(
        f"glora: layers has {len(codes)} codes; this backbone needs 1, {len(per_target)} (one per target) "
        f"or {len(roles)} (one per adapted layer: {spec.depth} blocks x {len(roles) // max(spec.depth, 1)})"
    )


def glora_param_count(cfg: GLoRAConfig, model: nn.Module, spec: ArchSpec) -> int:
    """Exact trainable parameters ``cfg`` adds to ``model`` (head excluded)."""
    total = 0
    for name, code in zip(layer_names(spec, cfg.targets), layer_codes(cfg, spec)):
        lin = get_module(model, name)
        total += glora_params(code, lin.in_features, lin.out_features, cfg.r, lin.bias is not None)
    return total


@register_method
class GLoRA(Method):
    config_cls = GLoRAConfig
    family = REPARAMETER
    paper = "Chavan et al., One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning, 2023"
    mergeable = True
    kinds = ("vit",)

    def target_roles(self, spec: ArchSpec) -> tuple[str, ...]:
        return self.config.targets

    def check_targets(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        layer_codes(self.config, spec)  # a wrong number of codes fails before anything is frozen

    def prepare(self, model: nn.Module, spec: ArchSpec, targets: list[Target]) -> None:
        self._codes = dict(zip((t.name for t in targets), layer_codes(self.config, spec)))

    def create(self, model: nn.Module, spec: ArchSpec, target: Target) -> nn.Module:
        return GLoRALinear(target.module, self._codes[target.name], self.config.r)
