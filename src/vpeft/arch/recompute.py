"""Selective recomputation of a backbone's blocks: activations recomputed in backward instead of kept.

:func:`recompute_blocks` makes chosen blocks run under ``torch.utils.checkpoint`` (non-reentrant): in a forward
with gradients enabled a recomputed block keeps only its inputs; backward runs its forward again (with the random
state it had, so dropout and drop-path draw the same masks) and then its backward. Losses and gradients are
bit-identical to running without it.

The block stays where it is, under its own name: its ``forward`` is replaced on the instance by a
:class:`RecomputedForward` that calls the original. No module is inserted, so parameter names, ``state_dict``
keys, the methods' wrappers, delta files and merging see the model exactly as before; :func:`stop_recompute`
restores the original ``forward``. Without gradients (evaluation, ``torch.no_grad``) a recomputed block runs as
usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError

__all__ = [
    "HALF",
    "RecomputedForward",
    "is_recomputed",
    "leading_blocks",
    "recompute_blocks",
    "recomputed_names",
    "stop_recompute",
]

HALF = 2 / 3
"""The fraction of the blocks ``TrainConfig(memory="half")`` recomputes (the first ones): a recomputed block keeps
only its input, about 0.11x of what it keeps otherwise (ViT-S/16), so ``f`` of the blocks recomputed keep
``1 - 0.89 f`` of the activations. Measured on ViT-S/16 (``benchmarks/bench_step.py --memory half``): 7 of 12
blocks kept 0.48x the limit's saved activations but 0.51x its peak memory (gradients and transient buffers come on
top), so ``f = 2/3`` (8 of 12: 0.40x saved), for 2/3 of the extra forward that recomputing every block costs."""


class RecomputedForward:
    """A module's ``forward`` run under non-reentrant activation checkpointing while gradients are enabled."""

    def __init__(self, forward: Callable[..., Any], previous: Callable[..., Any] | None = None) -> None:
        self.forward = forward
        self.previous = previous  # the instance's own forward it replaced (None: the class's)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)

    def __repr__(self) -> str:
        return f"RecomputedForward({getattr(self.forward, '__qualname__', self.forward)!r})"


def is_recomputed(module: nn.Module) -> bool:
    """Whether ``module``'s forward is recomputed in backward (:func:`recompute_blocks`)."""
    return isinstance(vars(module).get("forward"), RecomputedForward)


def recomputed_names(model: nn.Module) -> list[str]:
    """Qualified names of ``model``'s recomputed modules, in module order."""
    return [name for name, m in model.named_modules() if is_recomputed(m)]


def leading_blocks(blocks: Sequence[str], fraction: float) -> list[str]:
    """The first ``ceil(fraction * len(blocks))`` of ``blocks`` (at least one).

    Raises:
        ConfigError: ``fraction`` is not a number in (0, 1].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction!r} is invalid; expected a number in (0, 1] (1: every block)")
    return list(blocks)[: max(1, math.ceil(fraction * len(blocks)))]


def recompute_blocks(model: nn.Module, blocks: Sequence[str], every: int = 1) -> list[str]:
    """Recompute every ``every``-th of the named ``blocks`` of ``model`` in backward (the first, then each
    ``every``-th after it); returns the names now recomputed. Blocks already recomputed stay so (idempotent).

    ``every=1`` recomputes every block (the least activation memory: the blocks' inputs); ``every=2`` half of them.

    Raises:
        ConfigError: ``every`` is not a positive int, or ``blocks`` is empty.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"every={every!r} is invalid; expected a positive int (1: recompute every block)")
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no blocks to recompute")
    chosen = list(blocks)[::every]
    for name in chosen:
        block = model.get_submodule(name)
        if not is_recomputed(block):
            block.forward = RecomputedForward(block.forward, vars(block).get("forward"))
    return chosen


def stop_recompute(model: nn.Module) -> list[str]:
    """Undo :func:`recompute_blocks` on every module of ``model``; returns the names restored."""
    names = recomputed_names(model)
    for name in names:
        block = model.get_submodule(name)
        previous = vars(block)["forward"].previous
        if previous is None:
            del block.forward  # the instance attribute: the class's forward shows again
        else:
            block.forward = previous
    return names
