"""``vpeft serve``: many adapters of one frozen backbone behind an HTTP API, batched across adapters.

- :class:`AdapterStore` (:mod:`vpeft.serve.store`): the delta folder, refusals, lazy loading, the LRU cache and pins;
  shared adapters run in one :class:`vpeft.multitask.MultiTaskModel` forward, the others on their own models.
- :class:`DynamicBatcher` (:mod:`vpeft.serve.batcher`): queued requests, batches formed within a deadline, grouped by
  what shares a forward.
- :func:`create_app` (:mod:`vpeft.serve.app`, needs ``pip install 'vpeft[serve]'``): the FastAPI application.

Names are imported on first use, so ``vpeft --help`` (which registers :mod:`vpeft.serve.cli`) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **dict.fromkeys(
        (
            "OWN",
            "SHARED",
            "AdapterInfo",
            "AdapterRefusedError",
            "AdapterStore",
            "CacheStats",
            "RescanReport",
            "check_adapter_id",
        ),
        "store",
    ),
    "DynamicBatcher": "batcher",
    "create_app": "app",
}
__all__ = sorted(_WHERE)  # noqa: PLE0605 - one list of the lazy names: _WHERE


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
