"""Built-in methods: importing this package registers every one of them."""

from . import (  # noqa: F401
    adapter,
    adaptformer,
    bitfit,
    full,
    linear,
    ln_tune,
    lora,
    partial,
    ssf,
    vpt,
)
from .base import FAMILIES, Method

__all__ = ["Method", "FAMILIES"]
