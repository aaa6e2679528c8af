"""Small helpers to find and replace sub-modules by qualified name."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BATCH_NORMS", "DROPOUTS", "get_module", "parent_of", "probe_shapes", "set_module", "tensor_versions"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return get_module(model, parent), attr


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = parent_of(model, name)
    setattr(parent, attr, module)


def probe_shapes(model: nn.Module, names: list[str], size: tuple[int, int]) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Input and output shapes of the named sub-modules for one ``size`` image (no gradients, eval mode).

    The model's train/eval flags are restored afterwards; in eval mode no normalisation statistics change.
    """
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            shapes[name] = (args[0].shape, output.shape)

        return record

    w = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    handles = [get_module(model, n).register_forward_hook(hook(n)) for n in names]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *size, device=w.device, dtype=w.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return shapes


BATCH_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""Every torch BatchNorm class (the lazy variants and timm's ``BatchNormAct2d`` subclass these), public names only."""

DROPOUTS: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
"""Every torch dropout class (each has a rate ``p``)."""


def tensor_versions(tensors) -> tuple[int, ...]:
    """The in-place version counters of ``tensors`` (they grow at every in-place write: an optimiser step, a
    loaded delta, a merge), to know whether a cache computed from them is still valid.

    This is the one place vpeft reads a private torch attribute, ``Tensor._version``: torch has no public API for
    the counter its autograd uses to detect in-place changes (documented in "Autograd mechanics: in-place
    correctness checks"), and comparing the tensors themselves would cost a copy of every one of them.
    ``tests/test_architecture.py`` allows it here and nowhere else.
    """
    return tuple(int(t._version) for t in tensors)
