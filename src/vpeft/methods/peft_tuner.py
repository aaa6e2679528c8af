"""PEFT tuner bridge: any Hugging Face PEFT tuner (LoHa, LoKr, OFT, BOFT, VeRA, IA3, LoRA, ...) as a vpeft method.

Reference: Mangrulkar et al., "PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods",
https://github.com/huggingface/peft (2022-); the tuners' own papers, e.g. Hyeon-Woo et al., FedPara (LoHa),
ICLR 2022; Yeh et al., LyCORIS (LoKr), ICLR 2024; Qiu et al., OFT, NeurIPS 2023; Kopiczko et al., VeRA,
ICLR 2024.

The tuner config is PEFT's own, given as a dict (``{"peft_type": "LOHA", "r": 8, "alpha": 8}``) and built
with ``peft.get_peft_config``. Its layers are injected with ``peft.inject_adapter_in_model`` into the
backbone; vpeft then holds each injected layer in a :class:`PeftTunerLayer` wrapper over the frozen module
PEFT wrapped, so vpeft's trainable set, report, delta checkpoints, merge/unmerge and composition work
unchanged. The trainable tensors are picked by PEFT's layer types: the parameters under each
``BaseTunerLayer``'s ``adapter_layer_names`` (never by name substrings). Merging calls the layer's own
``merge()`` (additive, multiplicative or scaling -- whatever the tuner defines) and unwraps, so the merged
model is the plain backbone.

Targets: vpeft's block roles (``qkv``, ``q``/``k``/``v`` on backbones with separate projections, ``proj``,
``fc1``, ``fc2``; ``pw``/``kxk`` on CNNs) resolved through the ArchSpec into exact module names -- so
``proj`` never also hits timm's ``patch_embed.proj`` as PEFT's suffix matching would. A ``target_modules``
inside ``peft_config`` overrides them with PEFT's own matching. ``peft`` is imported at apply time only.

Default: LoHa, r = 8, alpha = 8 on qkv and fc1 (PEFT's LoHa defaults: ``init_weights=True``, the identity at
initialisation). ViT-B/16: LoHa holds ``w1_a (out x r), w1_b (r x in), w2_a (out x r), w2_b (r x in)`` per
layer, ``2 r (out + in)``: qkv 2 * 8 * (2304 + 768) = 49,152, fc1 2 * 8 * (3072 + 768) = 61,440;
12 * 110,592 = 1,327,104 parameters.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .._modules import set_module
from ..arch import ArchSpec, role_modules
from ..config import MethodConfig
from ..errors import ConfigError, UnsupportedBackboneError
from ..layers.base import Wrapper
from ..registry import register_method
from .base import UNIFIED, Method

__all__ = ["PeftTunerConfig", "PeftTuner", "PeftTunerLayer"]

ADAPTER = "default"
ROLES = ("qkv", "q", "k", "v", "proj", "fc1", "fc2", "pw", "kxk")
_DEFAULT = json.dumps({"alpha": 8, "peft_type": "LOHA", "r": 8}, sort_keys=True)


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "peft_tuner needs Hugging Face PEFT: pip install 'vpeft[interop]' (or pip install peft)"
        ) from None
    return peft


class PeftTunerLayer(Wrapper):
    """One injected PEFT tuner layer, held over the frozen module it wraps (``base_layer``).

    ``tuner`` is PEFT's layer (its own ``base_layer`` is the same module object); the delta is the
    parameters under its ``adapter_layer_names``. Merging folds the adapter with PEFT's ``merge()``; the
    layer is then marked unmerged again because vpeft unwraps it (and restores the weights on unmerge).
    """

    mergeable = True

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__(tuner.get_base_layer())
        self.tuner = tuner

    def forward(self, *args, **kwargs):
        return self.tuner(*args, **kwargs)

    def delta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for attr in self.tuner.adapter_layer_names:
            holder = getattr(self.tuner, attr, None)
            if isinstance(holder, nn.Module):
                for name, p in holder.named_parameters():
                    yield f"tuner.{attr}.{name}", p

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self.tuner.merge(adapter_names=[ADAPTER])
        self.tuner.merged_adapters.clear()

    def extra_repr(self) -> str:
        return f"tuner={type(self.tuner).__module__}.{type(self.tuner).__name__}"


def _canonical(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"peft_tuner: peft_config={value!r} is not a JSON object") from None
    if not isinstance(value, Mapping) or not isinstance(value.get("peft_type"), str):
        raise ConfigError(
            f"peft_tuner: peft_config={value!r} is invalid; expected a dict with a 'peft_type' "
            "(e.g. {'peft_type': 'LOHA', 'r': 8})"
        )
    return json.dumps(dict(value), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class PeftTunerConfig(MethodConfig):
    """A PEFT tuner run through vpeft.

    Attributes:
        peft_config: PEFT's tuner config as a dict (stored as canonical JSON): ``peft_type`` plus that
            tuner's options. Its ``target_modules``, when given, replaces ``targets``.
        targets: vpeft block roles to adapt: qkv (fused, or q/k/v where separate), q, k, v (separate
            projections only), proj, fc1, fc2; pw, kxk on CNNs.
    """

    method = "peft_tuner"
    peft_config: str = _DEFAULT
    targets: tuple[str, ...] = ("qkv", "fc1")

    def __post_init__(self) -> None:
        object.__setattr__(self, "peft_config", _canonical(self.peft_config))
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        super().__post_init__()

    def validate(self) -> None:
        bad = [t for t in self.targets if t not in ROLES]
        if bad or not self.targets:
            raise ConfigError(
                f"peft_tuner: targets={list(self.targets)!r} is invalid; valid options: {', '.join(ROLES)}"
            )

    @property
    def peft_dict(self) -> dict[str, Any]:
        return json.loads(self.peft_config)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["peft_config"] = self.peft_dict
        return out


@register_method
class PeftTuner(Method):
    config_cls = PeftTunerConfig
    family = UNIFIED
    paper = "Mangrulkar et al., PEFT (Hugging Face), 2022-; the tuner's own paper"
    mergeable = True
    kinds = ("vit", "swin", "cnn")

    def __init__(self, config: PeftTunerConfig) -> None:
        super().__init__(config)
        # PEFT's tuners start as the identity unless an init_* option asks for a random init
        self.identity_at_init = not any(k.startswith("init") and v is False for k, v in config.peft_dict.items())

    def _modules(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        roles = role_modules(model, spec)  # the arch layer's role -> module names (qkv: fused, or the three)
        names: list[str] = []
        for target in self.config.targets:
            found = roles.get(target, [])
            if not found:
                fused = target in ("q", "k", "v") and roles.get("qkv")
                hint = " (PEFT adapts a fused qkv whole: use 'qkv')" if fused else ""
                raise UnsupportedBackboneError(
                    f"peft_tuner: {spec.arch} has no {target!r} layers{hint}; "
                    f"roles here: {', '.join(t for t, v in roles.items() if v)}"
                )
            names += found
        return names

    def _peft_config(self, model: nn.Module, spec: ArchSpec):
        _peft()
        from peft.config import PromptLearningConfig
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        opts = self.config.peft_dict
        peft_type = str(opts["peft_type"]).upper()
        cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
        if cls is None:
            known = ", ".join(sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING))
            raise ConfigError(f"peft_tuner: unknown peft_type {opts['peft_type']!r}; PEFT knows {known}")
        if issubclass(cls, PromptLearningConfig) or peft_type == "ADAPTION_PROMPT":
            raise ConfigError(
                f"peft_tuner: {peft_type} is a prompt-learning method, not a layer tuner; "
                "use vpeft's vpt_deep / vpt_shallow / prefix instead"
            )
        opts["peft_type"] = peft_type
        opts.setdefault("target_modules", self._modules(model, spec))
        try:
            return cls(**{k: v for k, v in opts.items() if k != "peft_type"})
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"peft_tuner: PEFT rejects peft_config={self.config.peft_dict}: {exc}") from None

    def check(self, model: nn.Module, spec: ArchSpec) -> None:
        super().check(model, spec)
        if "target_modules" not in self.config.peft_dict:
            self._modules(model, spec)

    def inject(self, model: nn.Module, spec: ArchSpec) -> list[str]:
        peft = _peft()
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        from peft.tuners.tuners_utils import BaseTunerLayer

        cfg = self._peft_config(model, spec)
        try:
            if getattr(PEFT_TYPE_TO_TUNER_MAPPING.get(cfg.peft_type), "uses_shared_state", False):
                # e.g. VeRA's shared random projections: every layer references them, so the tuner object that
                # inject_adapter_in_model refuses to drop is not needed (the projections are frozen buffers)
                PEFT_TYPE_TO_TUNER_MAPPING[cfg.peft_type](model, cfg, adapter_name=ADAPTER)
            else:
                peft.inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
        except ValueError as exc:  # e.g. "Target modules ... not found in the base model"
            raise UnsupportedBackboneError(f"peft_tuner: PEFT cannot adapt this {spec.arch}: {exc}") from None
        names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        for name in names:
            set_module(model, name, PeftTunerLayer(model.get_submodule(name)))
        for attr in ("peft_config", "_hf_peft_config_loaded"):  # PEFT's bookkeeping on the model object
            model.__dict__.pop(attr, None)
        return names
