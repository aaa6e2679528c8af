"""Built-in methods, one module each: importing this package registers every one of them.

Modules are discovered automatically, so adding a method is adding one file here.
"""

import importlib
import pkgutil

from .base import FAMILIES, Method

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "FAMILIES"]
