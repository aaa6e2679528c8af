"""The checks of ``vpeft serve``'s access options (a bearer token, CORS origins), light enough for the CLI to run
before the server's dependencies are imported."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["check_access"]

_ORIGIN = re.compile(r"https?://[^/\s?#]+")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an HTTP header carries as it is


def check_access(token: str | None, cors_origins: Sequence[str], names: tuple[str, str] = ("token", "cors_origins")):
    """A token of visible ASCII characters (no spaces) and origins ``http(s)://host[:port]`` (no path), or
    ConfigError naming the bad value (``names``: how the caller calls the two)."""
    if token is not None and (not isinstance(token, str) or not _TOKEN.fullmatch(token)):
        shown = repr(token) if not isinstance(token, str) or not token else f"(a value of {len(token)} characters)"
        raise ConfigError(f"{names[0]} {shown} must be a non-empty string of visible ASCII characters (no spaces)")
    if isinstance(cors_origins, str):
        raise ConfigError(f"{names[1]} must be a list of origins, got the string {cors_origins!r}")
    for origin in cors_origins:
        if not isinstance(origin, str) or not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"{names[1]} {origin!r} is not an origin; give scheme://host[:port] with http or "
                              "https and no path, e.g. https://app.example.com")  # fmt: skip
