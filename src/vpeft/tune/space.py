"""Search spaces of ``vpeft tune``: ``KEY=SPEC`` strings -> typed parameters -> Optuna suggestions.

A spec is one of

* ``LO:HI`` (a float, uniform), ``LO:HI:log`` (a float, log-uniform), ``LO:HI:int`` / ``LO:HI:int,log``
  (an integer, inclusive bounds), ``LO:HI:STEP`` (a float on a grid: LO, LO + STEP, ...);
* ``A,B,C`` (a categorical choice; numbers are read as ints or floats, ``true`` / ``false`` as bools, anything
  else stays a string).

A key names either a training hyper-parameter (a :class:`vpeft.train.TrainConfig` field: ``lr``,
``weight_decay``, ``warmup_epochs``, ``batch_size``, ``label_smoothing`` ...) or an option of the tuned method's
config (``r``, ``alpha``, ``bottleneck``, ``num_tokens`` ...); for a composition (``lora+vpt_deep``) method options
are written ``METHOD.KEY`` (``lora.r=4,8``). Every key is checked against those fields up front, with the valid
names in the error, and every suggested value is validated by the config it goes into before a trial trains.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError

__all__ = ["Param", "SearchSpace", "parse_space", "parse_value", "train_keys"]


def parse_value(raw: str) -> Any:
    """``"8"`` -> 8, ``"1e-3"`` -> 0.001, ``"true"`` -> True, anything else: the string."""
    text = raw.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


@dataclasses.dataclass(frozen=True)
class Param:
    """One tuned parameter: ``kind`` is ``"float"``, ``"int"`` or ``"categorical"``."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "categorical":
            if len(self.choices) < 1:
                raise ConfigError(f"--space {self.name}: give at least one choice")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ConfigError(f"--space {self.name}: repeated choice in {list(self.choices)}")
            return
        lo, hi = self.low, self.high
        if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
            raise ConfigError(f"--space {self.name}: bounds must be finite numbers, got {lo!r}:{hi!r}")
        if not lo < hi:
            raise ConfigError(f"--space {self.name}: the low bound {lo!r} must be below the high bound {hi!r}")
        if self.log and lo <= 0:
            raise ConfigError(f"--space {self.name}: a log scale needs a positive low bound, got {lo!r}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ConfigError(f"--space {self.name}: a step must be positive and cannot combine with log")

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` draws for this parameter."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log, step=self.step)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choices"] = list(self.choices)
        return d

    def describe(self) -> str:
        if self.kind == "categorical":
            return ",".join(str(c) for c in self.choices)
        flags = [f for f, on in (("int", self.kind == "int"), ("log", self.log)) if on]
        tail = f":{','.join(flags)}" if flags else (f":{self.step:g}" if self.step else "")
        return f"{self.low:g}:{self.high:g}{tail}"


def _parse_one(item: str) -> Param:
    name, sep, spec = item.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise ConfigError(f"--space {item!r} is not KEY=SPEC (e.g. lr=1e-4:1e-2:log, r=4,8,16)")
    if ":" not in spec:
        return Param(name, "categorical", choices=tuple(parse_value(c) for c in spec.split(",") if c.strip()))
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"--space {item!r}: a range is LO:HI or LO:HI:FLAGS (log, int, int,log or a step)")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--space {item!r}: range bounds must be numbers, got {parts[0]!r}:{parts[1]!r}") from None
    flags = {f.strip() for f in parts[2].split(",")} if len(parts) == 3 else set()
    step = None
    if flags and not flags <= {"log", "int"}:
        if len(flags) == 1 and isinstance(parse_value(parts[2]), (int, float)):
            step, flags = float(parts[2]), set()
        else:
            raise ConfigError(f"--space {item!r}: unknown range flag(s) {sorted(flags)}; valid: log, int, or a step")
    if "int" in flags and (lo != int(lo) or hi != int(hi)):
        raise ConfigError(f"--space {item!r}: an int range needs integer bounds")
    return Param(name, "int" if "int" in flags else "float", lo, hi, log="log" in flags, step=step)


def train_keys() -> set[str]:
    """The :class:`vpeft.train.TrainConfig` fields a space may tune (``seed`` and I/O fields excluded)."""
    from ..train import TrainConfig

    skip = {"seed", "log_every", "checkpoint_every", "feature_cache", "compile", "epochs"}
    return {f.name for f in dataclasses.fields(TrainConfig)} - skip


def _method_fields(method: str) -> dict[str, set[str]]:
    """``{method name: its config's option names}`` for a method or a ``+`` composition."""
    from ..registry import get_method

    out = {}
    for name in [m for m in method.split("+") if m]:
        cls = get_method(name).config_cls
        out[name] = {f.name for f in dataclasses.fields(cls)} - {"method"}
    return out


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The tuned parameters of one method, split into training keys and method-option keys."""

    method: str
    params: tuple[Param, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if not names:
            raise ConfigError("the search space is empty: give at least one --space KEY=SPEC")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"--space names {', '.join(dup)} more than once")
        fields = _method_fields(self.method)
        composed = len(fields) > 1
        valid = set(train_keys())
        for m, opts in fields.items():
            valid |= {f"{m}.{o}" for o in opts} if composed else opts
        bad = [n for n in names if n not in valid]
        if bad:
            raise ConfigError(
                f"--space key {bad[0]!r} is neither a training hyper-parameter nor an option of {self.method}; "
                f"valid keys: {', '.join(sorted(valid))}"
            )

    def is_train_key(self, name: str) -> bool:
        return name in train_keys()

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    def split(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(training overrides, method-option overrides)`` of one assignment."""
        train = {k: v for k, v in values.items() if self.is_train_key(k)}
        return train, {k: v for k, v in values.items() if not self.is_train_key(k)}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": [p.to_dict() for p in self.params]}

    def describe(self) -> list[str]:
        return [f"{p.name}={p.describe()}" for p in self.params]


def parse_space(method: str, items: Iterable[str] | Mapping[str, Any]) -> SearchSpace:
    """A :class:`SearchSpace` from ``["lr=1e-4:1e-2:log", "r=4,8"]`` or a mapping ``{"lr": "1e-4:1e-2:log",
    "r": [4, 8]}`` (a bench definition's ``tune: {space: ...}``; a list there is a categorical choice)."""
    if isinstance(items, Mapping):
        flat = []
        for k, v in items.items():
            spec = ",".join(str(c) for c in v) if isinstance(v, Sequence) and not isinstance(v, str) else str(v)
            flat.append(f"{k}={spec}")
        items = flat
    return SearchSpace(method, tuple(_parse_one(i) for i in items))
