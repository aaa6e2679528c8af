"""The one injection mechanism: a module that wraps a frozen ``base_layer`` in place."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["Wrapper", "FrozenStatsNorm", "map_output", "input_of"]


def input_of(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The main input of ``module(*args, **kwargs)``: the first positional argument, or the keyword named after
    the first parameter of the (innermost wrapped) module's ``forward`` -- Hugging Face CLIP calls
    ``self_attn(hidden_states=...)``."""
    if args:
        return args[0]
    while isinstance(module, Wrapper):
        module = module.base_layer
    return kwargs[next(iter(inspect.signature(module.forward).parameters))]


def map_output(output, fn):
    """``fn(output)``; for a tuple output (Hugging Face attention returns ``(output, weights)``) only its first item."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


class Wrapper(nn.Module):
    """Base class of every injected module.

    The wrapped module is kept as ``self.base_layer`` (frozen, never edited); the wrapper's own
    parameters are the method's trainable delta. Mergeable wrappers implement
    :meth:`merge_into_base`, which folds the delta into ``base_layer``'s tensors in place.
    """

    mergeable: bool = False
    #: only transforms its base layer's output, so it composes with any other wrapper of the same module
    stackable: bool = False
    #: set when another wrapper wraps this one (the outer one may then modify this one's output in place)
    wrapped: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer

    def __setattr__(self, name: str, value) -> None:
        if name == "base_layer" and isinstance(value, Wrapper):  # also when a wrapper is slid in underneath later
            value.wrapped = True
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the wrapped module (e.g. ``q_proj.weight.dtype`` read by
        Hugging Face models, ``patch_embed.grid_size`` by timm), so a wrapped model keeps working unchanged."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.base_layer, name)

    def delta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The wrapper's own parameters (not those of ``base_layer``)."""
        for name, param in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, param

    @torch.no_grad()
    def merge_into_base(self) -> None:
        """Fold this wrapper's effect into ``base_layer`` (in place)."""
        raise TypeError(f"{type(self).__name__} cannot be merged into its base layer")


class FrozenStatsNorm(Wrapper):
    """Keeps a BatchNorm's running statistics frozen: the base layer always runs in eval mode.

    A frozen backbone's BatchNorm must not drift during PEFT training, or a delta checkpoint (which
    holds only trainable tensors) could not reproduce the trained model. Affine parameters may
    still be trained by methods that choose them (BitFit, LN-tune).
    """

    mergeable = True

    def train(self, mode: bool = True) -> FrozenStatsNorm:
        super().train(mode)
        self.base_layer.train(False)
        return self

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def merge_into_base(self) -> None:  # nothing to fold: the wrapper only pins eval mode
        return None
