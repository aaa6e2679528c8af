"""Shared building blocks that methods inject: every one wraps a frozen ``base_layer``."""

from .base import FrozenStatsNorm, Wrapper
from .bottleneck import Bottleneck, ParallelAdapter, SequentialAdapter
from .lora import LoRALinear
from .prompt import PromptedBlock
from .scale_shift import ScaleShift

__all__ = [
    "Wrapper",
    "FrozenStatsNorm",
    "Bottleneck",
    "SequentialAdapter",
    "ParallelAdapter",
    "LoRALinear",
    "PromptedBlock",
    "ScaleShift",
]
