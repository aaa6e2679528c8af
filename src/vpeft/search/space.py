"""The interface of a structure-search space (NOAH, GLoRA): what the evolution and the supernet use.

In its own module so that the supernet (:mod:`vpeft.search.supernet`) and the spaces that build on its super
layers (:mod:`vpeft.search.spaces`) both depend on it without depending on each other.
"""

from __future__ import annotations

import abc
import random
from typing import Any, ClassVar

from torch import nn

from ..arch import ArchSpec
from ..config import MethodConfig

__all__ = ["Cand", "SearchSpace"]

Cand = tuple


class SearchSpace(abc.ABC):
    """The interface the evolution and the supernet use."""

    name: ClassVar[str]

    @abc.abstractmethod
    def random(self, rng: random.Random) -> Cand:
        """A uniformly sampled candidate (no budget)."""

    @abc.abstractmethod
    def mutate(self, cand: Cand, rng: random.Random, m_prob: float, s_prob: float) -> Cand:
        """A random mutation of ``cand``."""

    @abc.abstractmethod
    def crossover(self, a: Cand, b: Cand, rng: random.Random) -> Cand:
        """A random mix of two parents."""

    @abc.abstractmethod
    def shrink(self, cand: Cand, rng: random.Random) -> Cand | None:
        """``cand`` with one random part made smaller; ``None`` when nothing can shrink."""

    @abc.abstractmethod
    def params(self, cand: Cand) -> int:
        """Exact trainable parameters of the subnet (head excluded)."""

    @abc.abstractmethod
    def min_params(self) -> int:
        """Parameters of the smallest candidate."""

    @abc.abstractmethod
    def to_config(self, cand: Cand) -> MethodConfig:
        """The vpeft method config of the subnet (to apply and retrain with the normal trainer)."""

    @abc.abstractmethod
    def inject_supernet(self, model: nn.Module, spec: ArchSpec) -> Any:
        """Wrap ``model``'s modules with super layers; return what :meth:`activate` needs."""

    @abc.abstractmethod
    def activate(self, layers: Any, cand: Cand) -> None:
        """Make the super layers run the subnet ``cand``."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The space's settings (JSON)."""

    def to_json(self, cand: Cand) -> Any:
        return self.to_config(cand).to_dict()
