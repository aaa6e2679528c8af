"""The per-model state of an adapted model, public: what :func:`vpeft.apply` did and what trains.

Every module that needs to know about an adapted model (the api, interop, multi-task inference, the structure
search, methods that change their trainable set after training such as prefix folding) goes through this module;
nobody reads the attribute or another module's private helpers. The state is a plain attribute of the model
(never a sub-module, never in ``state_dict``).

One place decides what trains: :func:`trainable_names` (the parameters of every injected wrapper, the base
parameters the method selects, and the classification head or task decoder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ._modules import parent_of
from .errors import CheckpointError, ConfigError
from .layers.base import Wrapper

if TYPE_CHECKING:  # typing only: the state module sits below methods and arch in the import graph
    from .arch import ArchSpec
    from .config import MethodConfig


class Method(Protocol):
    """What the state needs of a method (:class:`vpeft.methods.base.Method` implements it): the backbone parameters
    it trains, and whether its deltas carry buffers. Declared here so the state never imports the methods."""

    saves_buffers: bool

    def select(self, model: nn.Module, spec: ArchSpec) -> list[str]: ...


__all__ = [
    "MergeRecord",
    "ModelState",
    "attach_state",
    "check_fit",
    "delta_tensors",
    "detach_state",
    "head_names",
    "is_adapted",
    "load_tensors",
    "set_trainable",
    "state_of",
    "trainable_names",
    "unwrap_all",
    "wrapper_parameters",
    "wrappers",
]

_ATTR = "_vpeft_state"


@dataclasses.dataclass
class MergeRecord:
    """One merged wrapper: where it was, the wrapper itself, and the base weights before merging."""

    name: str
    wrapper: Wrapper
    snapshot: dict[str, torch.Tensor] | None
    params_before: tuple[str, ...]


@dataclasses.dataclass
class ModelState:
    """What :func:`vpeft.apply` did to a model.

    Attributes:
        config / method / spec: the method's config and instance, and the backbone's ArchSpec.
        backbone: the backbone's name; fingerprint: of its frozen weights (classifier excluded).
        adapted: qualified names of the adapted modules.
        trainable: qualified names of every trainable tensor (what a delta holds).
        head: the classifier's (or task decoder's) tensor names among ``trainable``.
        decoder: the names of the task decoder's parameters (a :class:`vpeft.tasks.TaskModel`), a subset of
            ``head``.
        buffers: buffers a delta holds besides the trainable tensors (a task decoder's BatchNorm statistics).
        task: the task's ``to_dict()`` (``{"kind": "classification"}`` for a plain backbone).
        prefix: ``""`` for a plain backbone, ``"backbone."`` when the model is a TaskModel.
        merged: the merge records while merged, else None.
    """

    config: MethodConfig
    method: Method
    spec: ArchSpec
    backbone: str
    fingerprint: str
    adapted: list[str]
    trainable: list[str]
    head: list[str]
    decoder: list[str] = dataclasses.field(default_factory=list)
    buffers: list[str] = dataclasses.field(default_factory=list)
    task: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "classification"})
    prefix: str = ""
    merged: list[MergeRecord] | None = None
    keep_original: bool = True


def state_of(model: nn.Module) -> ModelState:
    """The state :func:`vpeft.apply` left on ``model``; ConfigError when none was applied."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        raise ConfigError(f"{type(model).__name__} has no vpeft method applied; call vpeft.apply(model, config) first")
    return state


def is_adapted(model: nn.Module) -> bool:
    """True when :func:`vpeft.apply` has been called on ``model``."""
    return _ATTR in model.__dict__


def attach_state(model: nn.Module, state: ModelState) -> None:
    model.__dict__[_ATTR] = state


def detach_state(model: nn.Module) -> None:
    model.__dict__.pop(_ATTR, None)


def head_names(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Qualified names of the classifier's parameters (empty when the backbone has none)."""
    if not spec.head:
        return []
    return [f"{spec.head}.{n}" for n, _ in model.get_submodule(spec.head).named_parameters()]


def wrapper_parameters(model: nn.Module) -> list[str]:
    """Qualified names of the own parameters of every injected :class:`~vpeft.layers.Wrapper`."""
    return [
        f"{mod_name}.{n}"
        for mod_name, module in model.named_modules()
        if isinstance(module, Wrapper)
        for n, _ in module.delta_parameters()
    ]


def trainable_names(model: nn.Module, method: Method, spec: ArchSpec) -> list[str]:
    """What trains in a backbone, decided in one place: wrapper parameters, the method's selected base parameters,
    the head (:func:`vpeft.apply` adds a task model's decoder)."""
    names = wrapper_parameters(model) + method.select(model, spec) + head_names(model, spec)
    return list(dict.fromkeys(names))


def set_trainable(model: nn.Module, names: Iterable[str]) -> None:
    """Freeze every parameter of ``model`` but ``names``."""
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)


def delta_tensors(model: nn.Module, state: ModelState | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of every tensor a delta file holds (trainable tensors; all buffers for methods that save them)."""
    state = state or state_of(model)
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach() for n in state.trainable}
    named_buffers = dict(model.named_buffers())
    tensors.update({n: named_buffers[n].detach() for n in state.buffers})
    if state.method.saves_buffers:
        tensors.update({n: b.detach() for n, b in model.named_buffers()})
    return {n: t.to("cpu").contiguous().clone() for n, t in tensors.items()}


def check_fit(
    expected: Mapping[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor],
    where: str,
    head: Iterable[str] = (),
) -> None:
    """Raise CheckpointError unless ``tensors`` has exactly the names of ``expected`` with the same shapes/dtypes."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {where!r} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    heads = set(head)
    for n, t in tensors.items():
        if expected[n].shape != t.shape:
            hint = (
                " (the head has another number of classes: create the backbone with matching num_classes)"
                if n in heads
                else ""
            )
            raise CheckpointError(
                f"checkpoint {where!r}: {n} has shape {tuple(t.shape)}, model {tuple(expected[n].shape)}{hint}"
            )
        if expected[n].dtype != t.dtype:
            raise CheckpointError(f"checkpoint {where!r}: {n} has dtype {t.dtype}, model {expected[n].dtype}")


def load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy a delta's tensors into the adapted ``model`` after checking names and shapes fit exactly."""
    state = state_of(model)
    params = dict(model.named_parameters())
    targets = {n: params[n] for n in state.trainable}
    named_buffers = dict(model.named_buffers())
    targets.update({n: named_buffers[n] for n in state.buffers})
    if state.method.saves_buffers:
        targets.update(dict(model.named_buffers()))
    check_fit(targets, tensors, where, state.head)
    with torch.no_grad():
        for n, t in tensors.items():
            targets[n].copy_(t)


def wrappers(model: nn.Module) -> list[tuple[str, Wrapper]]:
    """Every injected wrapper with its qualified name, innermost first."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Wrapper)]
    return found[::-1]


def unwrap_all(model: nn.Module) -> None:
    """Replace every wrapper by its base layer (innermost first); base weights are untouched by injection."""
    for name, wrapper in wrappers(model):
        parent, attr = parent_of(model, name)
        setattr(parent, attr, wrapper.base_layer)
