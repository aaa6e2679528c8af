"""Structure search (unified family): NOAH's and GLoRA's supernet + evolutionary search under a parameter budget.

Typical use (the ``vpeft search`` command runs the same recipe)::

    from vpeft.search import EvolutionConfig, run_search

    summary = run_search(backbone="dinov2_vits14_imgfocus", task="cifar10", space="noah", budget=50_000,
                         out_dir="runs/noah", supernet_epochs=5, retrain_epochs=5,
                         evolution=EvolutionConfig(population=10, generations=3))

Pieces: :mod:`~vpeft.search.spaces` (candidates, exact counts, export to the ``noah`` / ``glora`` method configs),
:mod:`~vpeft.search.supernet` (weight-sharing super layers, per-batch subnet sampling),
:mod:`~vpeft.search.evolution` (the evolutionary loop), :mod:`~vpeft.search.recipe` (train, search, retrain).
"""

from .evolution import Evaluated, EvolutionConfig, SearchResult, evolve, repair
from .recipe import run_search
from .spaces import SPACES, GLoRASpace, NOAHSpace, SearchSpace, build_space
from .supernet import Supernet, transfer_weights

__all__ = [
    "EvolutionConfig",
    "Evaluated",
    "SearchResult",
    "evolve",
    "repair",
    "run_search",
    "SPACES",
    "SearchSpace",
    "NOAHSpace",
    "GLoRASpace",
    "build_space",
    "Supernet",
    "transfer_weights",
]
