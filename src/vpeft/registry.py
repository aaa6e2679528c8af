"""The method registry: one name -> one :class:`~vpeft.methods.base.Method` subclass.

The registry drives the CLI's ``vpeft methods`` table and the test matrix: registering a method is
all it takes for it to be tested against every tiny backbone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .errors import ConfigError, UnknownNameError, suggest

if TYPE_CHECKING:
    from .methods.base import Method

__all__ = ["register_method", "get_method", "list_methods"]

_METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


def register_method(cls: M) -> M:
    """Class decorator adding a Method subclass under ``cls.config_cls.method``."""
    name = cls.config_cls.method
    if not name:
        raise ConfigError(f"{cls.__name__}.config_cls has no 'method' name")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ConfigError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
    _METHODS[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """Return the Method class registered as ``name``; unknown names list close matches."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownNameError(suggest(name, _METHODS, "method")) from None


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)
