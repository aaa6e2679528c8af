"""Method configurations: frozen, validated dataclasses with a JSON round-trip.

Every method owns one subclass of :class:`MethodConfig`. The class attribute ``method`` is the
registry name; ``__post_init__`` normalises lists to tuples (so configs stay hashable) and calls
``validate()``, which raises :class:`~vpeft.errors.ConfigError` naming the bad field, its value
and the allowed range.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from .errors import ConfigError, UnknownNameError, suggest

__all__ = ["MethodConfig", "check_int", "check_float", "check_choice", "check_subset"]


_CONFIGS: dict[str, type[MethodConfig]] = {}


def check_int(cfg: MethodConfig, field: str, low: int, high: int | None = None) -> None:
    """Raise ConfigError unless ``cfg.field`` is an int in ``[low, high]``."""
    value = getattr(cfg, field)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{cfg.method}: {field}={value!r} is invalid; expected an integer {rng}")


def check_float(
    cfg: MethodConfig, field: str, low: float, high: float | None = None, *, low_open: bool = False
) -> None:
    """Raise ConfigError unless ``cfg.field`` is a real number in the given range."""
    value = getattr(cfg, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        rng = lo if high is None else f"{lo} and <= {high}"
        raise ConfigError(f"{cfg.method}: {field}={value!r} is invalid; expected a number {rng}")


def check_choice(cfg: MethodConfig, field: str, options: Iterable[str]) -> None:
    """Raise ConfigError unless ``cfg.field`` is one of ``options``."""
    value = getattr(cfg, field)
    options = tuple(options)
    if value not in options:
        raise ConfigError(f"{cfg.method}: {field}={value!r} is invalid; valid options: {', '.join(options)}")


def check_subset(cfg: MethodConfig, field: str, options: Iterable[str], *, allow_empty: bool = False) -> None:
    """Raise ConfigError unless ``cfg.field`` is a tuple of distinct values from ``options``."""
    values = getattr(cfg, field)
    options = tuple(options)
    bad = [v for v in values if v not in options]
    if bad or (not values and not allow_empty) or len(set(values)) != len(values):
        what = f"unknown {bad[0]!r}" if bad else ("empty" if not values else "repeated entries")
        raise ConfigError(
            f"{cfg.method}: {field}={list(values)!r} is invalid ({what}); valid options: {', '.join(options)}"
        )


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of all method configurations."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every config class with a ``method`` name registers itself, so configs rebuild without the registry."""
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):
            _CONFIGS[cls.method] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Check the hyper-parameters; subclasses extend this."""

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return ``{"method": name, **fields}`` with tuples as lists (JSON-ready)."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> MethodConfig:
        """Build the config of the method named by ``data["method"]``."""
        if "method" not in data:
            raise ConfigError(f"config {dict(data)!r} has no 'method' key")
        name = str(data["method"])
        if name not in _CONFIGS:
            raise UnknownNameError(suggest(name, _CONFIGS, "method"))
        cls = _CONFIGS[name]
        return cls.from_kwargs({k: v for k, v in data.items() if k != "method"})

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> MethodConfig:
        """Build this config from keyword arguments; unknown keys raise ConfigError listing valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ConfigError(
                f"{cls.method}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid) or '(none)'}"
            )
        return cls(**kwargs)

    @staticmethod
    def from_json(text: str) -> MethodConfig:
        return MethodConfig.from_dict(json.loads(text))
