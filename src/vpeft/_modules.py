"""Small helpers to find and replace sub-modules by qualified name."""

from __future__ import annotations

from torch import nn

__all__ = ["get_module", "set_module", "parent_of"]


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return get_module(model, parent), attr


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, attr = parent_of(model, name)
    setattr(parent, attr, module)
