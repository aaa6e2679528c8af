"""Method configurations: frozen, validated dataclasses with a JSON round-trip.

Every method owns one subclass of :class:`MethodConfig`. The class attribute ``method`` is the
registry name; ``__post_init__`` normalises lists to tuples (so configs stay hashable) and calls
``validate()``, which raises :class:`~vpeft.errors.ConfigError` naming the bad field, its value
and the allowed range.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from .errors import ConfigError, UnknownNameError, suggest

__all__ = [
    "MethodConfig",
    "Range",
    "check_int",
    "check_float",
    "check_choice",
    "check_subset",
    "check_options",
    "declare_option_check",
    "ranged_option",
]


_CONFIGS: dict[str, type[MethodConfig]] = {}


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of one numeric setting: the one declaration of its bounds, checked by :meth:`check`.

    Method configs (:func:`check_int`, :func:`check_float`) and the command line's numeric options
    (:func:`ranged_option`) declare their bounds with it, so every refusal says the same thing: the setting, the
    bad value and the valid range. Floats must be finite; ``bool`` is not a number.

    Attributes:
        low: The smallest valid value (``None``: unbounded below).
        high: The largest valid value (``None``: unbounded above).
        integer: Only ints are valid (else ints and floats).
        low_open: ``low`` itself is invalid (``> low``).
        high_open: ``high`` itself is invalid (``< high``).
    """

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def int(cls, low: int | None = None, high: int | None = None) -> Range:
        """Integers in ``[low, high]``."""
        return cls(low, high, integer=True)

    @classmethod
    def float(
        cls, low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
    ) -> Range:
        """Finite numbers between ``low`` and ``high`` (each bound included unless ``*_open``)."""
        return cls(low, high, low_open=low_open, high_open=high_open)

    @property
    def __name__(self) -> str:  # argparse names a type in its "invalid int value" message
        return "int" if self.integer else "float"

    def __call__(self, raw: str) -> int | float:
        """Convert a command-line string (``type=`` of an argparse option); the range is checked after parsing, by
        :func:`check_options`, so that the error is one line naming the option."""
        return int(raw) if self.integer else float(raw)

    def __contains__(self, value: object) -> bool:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.integer and not isinstance(value, int))
        ):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        """``an integer >= 1``, ``an integer in [0, 4294967295]``, ``a number > 0``, ``a number in [0, 1)``."""
        what = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {_num(self.high)}"
        return what if self.integer else "a finite number"

    def check(self, name: str, value: Any) -> None:
        """Raise ConfigError ``"{name}={value} is invalid; expected {range}"`` unless ``value`` is in the range."""
        if value not in self:
            raise ConfigError(f"{name}={value!r} is invalid; expected {self}")

    def outside(self) -> list[int | float]:
        """Values just outside the range (below ``low``, above ``high``): what a test of the check tries."""
        out: list[int | float] = []
        if self.low is not None:
            out.append(self.low if self.low_open else self.low - (1 if self.integer else max(0.5, abs(self.low))))
        if self.high is not None:
            out.append(self.high if self.high_open else self.high + (1 if self.integer else max(0.5, abs(self.high))))
        return [int(v) if self.integer else float(v) for v in out]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else str(value)


def check_int(cfg: MethodConfig, field: str, low: int, high: int | None = None) -> None:
    """Raise ConfigError unless ``cfg.field`` is an int in ``[low, high]``."""
    Range.int(low, high).check(f"{cfg.method}: {field}", getattr(cfg, field))


def check_float(
    cfg: MethodConfig, field: str, low: float, high: float | None = None, *, low_open: bool = False
) -> None:
    """Raise ConfigError unless ``cfg.field`` is a finite number in the given range."""
    Range.float(low, high, low_open=low_open).check(f"{cfg.method}: {field}", getattr(cfg, field))


# ---- the command line's declared option checks ----------------------------------------------------------------------
OPTION_CHECKS = "option_checks"
"""The parser default (a ``{dest: (flag, check)}`` dict) where a command's options declare their checks."""


def declare_option_check(parser: Any, action: Any, check: Callable[[str, Any], None]) -> Any:
    """Declare that option ``action`` (what ``parser.add_argument`` returned; ``parser`` a command's parser or one
    of its argument groups) is checked by ``check(flag, value)`` before the command runs (:func:`check_options`).
    Returns ``action``."""
    checks = dict(parser.get_default(OPTION_CHECKS) or {})
    flag = "/".join(o for o in action.option_strings if o.startswith("--")) or action.option_strings[0]
    checks[action.dest] = (flag, check)
    parser.set_defaults(**{OPTION_CHECKS: checks})
    return action


def ranged_option(parser: Any, *flags: str, range: Range, **kwargs: Any) -> Any:
    """``parser.add_argument(*flags, **kwargs)`` for a numeric option whose valid values are ``range`` (checked by
    :func:`check_options`, its default included unless ``None``)."""

    def check(flag: str, value: Any) -> None:
        if value not in range:
            raise ConfigError(f"{flag} {value!r} is invalid; expected {range}")

    return declare_option_check(parser, parser.add_argument(*flags, type=range, **kwargs), check)


def check_options(args: Any) -> None:
    """Run every check the command's options declared (:func:`declare_option_check`) on the parsed ``args``, before
    any work: numeric ranges, writable destinations. ``None`` values (an option not given) are skipped.

    Raises:
        ConfigError: The first option that fails, named with its value and what is valid.
    """
    for dest, (flag, check) in (getattr(args, OPTION_CHECKS, None) or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            check(flag, value)


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
