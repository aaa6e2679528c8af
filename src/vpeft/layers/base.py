"""The one injection mechanism: a module that wraps a frozen ``base_layer`` in place."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["Wrapper", "FrozenStatsNorm", "map_output", "input_of", "has_task_delta"]


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

    # ---- the per-sample protocol (used by vpeft.multitask; see has_task_delta) ---------------------------------
    #: :meth:`apply_delta` reads the base layer's input (LoRA, parallel adapters), not only its output
    delta_reads_input: bool = False

    def apply_delta(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """This wrapper's function given its base layer's output: ``forward(x) == apply_delta(x, base_layer(x))``.

        ``y`` is the base layer's output (its first item for tuple outputs) for some rows of a batch and ``x``
        its main input for the same rows (``None`` unless :attr:`delta_reads_input`). The result may be ``y``
        modified in place. Inference form: eval mode, no autograd through the in-place ops. A wrapper that
        implements it (and computes row by row: no token or batch mixing) can hold one task's delta in a mixed
        batch (:class:`vpeft.MultiTaskModel` applies it to each task's rows, beside the one shared base layer).
        """
        raise TypeError(f"{type(self).__name__} has no per-sample form (apply_delta)")

    @classmethod
    def stack_deltas(cls, layers: Mapping[int, Wrapper], num_tasks: int) -> nn.Module | None:
        """Optional: one module applying, row by row, the delta of each row's task, ``module(x, y, row_task)``.

        ``layers`` maps task index -> that task's layer (all of class ``cls``); tasks absent there add nothing.
        ``None`` (the default) lets the caller apply :meth:`apply_delta` to each task's rows.
        """
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Optional: a temporary copy of the base Linear's ``weight`` with this delta folded in (``weight`` is not
        modified), when the delta is exactly a weight update; ``None`` (the default) otherwise."""
        return None

    def release_base(self) -> nn.Module:
        """Drop the reference to ``base_layer`` and return it: the wrapper then holds only its delta (a per-sample
        model keeps one such wrapper per task beside the one shared base layer). Its forward no longer works."""
        base = self.base_layer
        del self.base_layer
        return base


def has_task_delta(module: nn.Module) -> bool:
    """Whether ``module`` is a wrapper implementing the per-sample protocol (:meth:`Wrapper.apply_delta`).

    Its class must define ``apply_delta`` itself or inherit it from a class that also defines the ``forward`` it
    inherits: a subclass that changes ``forward`` (DoRA over LoRA) must implement ``apply_delta`` again.
    """
    if not isinstance(module, Wrapper):
        return False
    cls = type(module)
    owner = next(c for c in cls.__mro__ if "apply_delta" in c.__dict__)
    forward_owner = next(c for c in cls.__mro__ if "forward" in c.__dict__)
    return owner is not Wrapper and issubclass(owner, forward_owner)


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
