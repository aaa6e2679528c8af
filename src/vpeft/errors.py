"""Typed exceptions raised by vpeft.

Every error names the bad value and, where there is a finite set, the valid options, so that a
one-line message is enough to fix the call.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "VpeftError",
    "ConfigError",
    "UnknownNameError",
    "UnsupportedBackboneError",
    "CheckpointError",
    "DataError",
    "suggest",
]


class VpeftError(Exception):
    """Base class of all vpeft errors."""


class ConfigError(VpeftError, ValueError):
    """A hyper-parameter or option has an invalid value."""


class UnknownNameError(ConfigError, KeyError):
    """A registered name (method, backbone family, task kind, decoder, protocol ...) is not known.

    The message lists close matches and every valid name. It is a :class:`ConfigError` (a bad option value) and a
    ``KeyError`` (a failed look-up), so either ``except`` catches it.
    """

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class UnsupportedBackboneError(VpeftError, TypeError):
    """A method cannot be applied to the given backbone architecture."""


class CheckpointError(VpeftError, ValueError):
    """A delta checkpoint is missing, truncated, or belongs to another backbone."""


class DataError(VpeftError, ValueError):
    """A data root, split list or label is missing or malformed."""


def suggest(name: str, options: Iterable[str], what: str) -> str:
    """Build an 'unknown name' message listing close matches and all valid options."""
    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    consonant_y = what.endswith("y") and len(what) > 1 and what[-2] not in "aeiou"
    plural = f"{what[:-1]}ies" if consonant_y else f"{what}s"  # family -> families, key -> keys
    return f"unknown {what} {name!r}.{hint} Valid {plural}: {', '.join(options)}"
