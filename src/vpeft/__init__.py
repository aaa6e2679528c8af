"""vpeft: parameter-efficient fine-tuning of pre-trained vision models.

Small public API::

    import timm, vpeft
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=10)
    report = vpeft.apply(model, vpeft.LoRAConfig(r=8, targets=("q", "v")))
    ...train...
    vpeft.save(model, "task.safetensors")      # the delta only
    vpeft.merge(model)                          # zero-overhead inference

The subpackages (``vpeft.train``, ``vpeft.data``, ``vpeft.backbones``, ``vpeft.interop``, ``vpeft.run`` ...) are
attributes of the package after a plain ``import vpeft``: each is imported on first access.
"""

import importlib

from .api import Report, apply, backbone_name, fingerprint, is_adapted, load, merge, report, save, save_merged, unmerge
from .config import MethodConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    UnknownNameError,
    UnsupportedBackboneError,
    VpeftError,
)
from .methods.adapter import AdapterConfig
from .methods.adaptformer import AdaptFormerConfig
from .methods.bitfit import BitFitConfig
from .methods.full import FullConfig
from .methods.linear import LinearConfig
from .methods.ln_tune import LNTuneConfig
from .methods.lora import LoRAConfig
from .methods.partial import PartialConfig
from .methods.ssf import SSFConfig
from .methods.vpt import VPTDeepConfig, VPTShallowConfig
from .multitask import MultiTaskModel, MultiTaskOutput
from .registry import get_method, list_methods, register_method
from .version import __version__

# subpackages imported on first attribute access (``vpeft.train.train(...)`` after only ``import vpeft``)
LAZY_SUBMODULES = frozenset(
    {"backbones", "bench", "cli", "data", "devices", "interop", "run", "search", "train", "tune"}
)


def __getattr__(name: str):
    if name in LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | LAZY_SUBMODULES)


__all__ = [
    "__version__",
    "apply",
    "report",
    "save",
    "load",
    "merge",
    "unmerge",
    "save_merged",
    "backbone_name",
    "fingerprint",
    "is_adapted",
    "Report",
    "MethodConfig",
    "get_method",
    "list_methods",
    "register_method",
    "VpeftError",
    "ConfigError",
    "UnknownNameError",
    "UnsupportedBackboneError",
    "CheckpointError",
    "DataError",
    "LinearConfig",
    "FullConfig",
    "BitFitConfig",
    "LNTuneConfig",
    "PartialConfig",
    "LoRAConfig",
    "AdapterConfig",
    "AdaptFormerConfig",
    "VPTShallowConfig",
    "VPTDeepConfig",
    "SSFConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
]
