"""One registration mechanism for everything vpeft looks up by name.

Methods, backbone families, task types, decoders, detectors and evaluation protocols each live in a
:class:`Registry`. Every registry registers the same way (a decorator, or a direct call) and fails the same way
on an unknown name: an :class:`~vpeft.errors.UnknownNameError` listing close matches and every valid name. The
method registry drives the CLI's ``vpeft methods`` table and the test matrix: registering a method is all it
takes for it to be tested against every tiny backbone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import ConfigError, UnknownNameError, suggest

if TYPE_CHECKING:
    from .methods.base import Method

__all__ = ["Registry", "register_method", "get_method", "list_methods", "METHODS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind (``what`` is the word used in errors: ``"method"``, ``"decoder"`` ...).

    ``register(name)`` returns a decorator; ``register(name, obj)`` registers directly. Registering another
    object under a taken name is a :class:`ConfigError` (re-registering the same object is a no-op, so a module
    reloaded in a test does not fail). ``get`` raises :class:`UnknownNameError` with suggestions.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        if not name or not isinstance(name, str):
            raise ConfigError(f"a {self.what} needs a non-empty name, got {name!r}")

        def add(item: T) -> T:
            old = self._items.get(name)
            if old is not None and old is not item and _ident(old) != _ident(item):
                raise ConfigError(f"{self.what} {name!r} is already registered by {_label(old)}")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a throw-away entry clean up with this)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(suggest(str(name), self._items, self.what)) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, object)`` in registration order (order matters where the first match wins)."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def _ident(obj: Any) -> tuple[str, str]:
    """Where an object was defined: a module reloaded re-registers its own classes without a clash."""
    return (getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "") or repr(obj))


def _label(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


METHODS: Registry[type[Method]] = Registry("method")
M = TypeVar("M", bound="type[Method]")


def register_method(cls: M) -> M:
    """Class decorator adding a Method subclass under ``cls.config_cls.method``."""
    name = cls.config_cls.method
    if not name:
        raise ConfigError(f"{cls.__name__}.config_cls has no 'method' name")
    return METHODS.register(name, cls)


def get_method(name: str) -> type[Method]:
    """Return the Method class registered as ``name``; unknown names list close matches."""
    return METHODS.get(name)


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return METHODS.names()
