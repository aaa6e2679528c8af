"""``vpeft serve``: many adapters of one frozen backbone behind an HTTP API, batched across adapters.

- :class:`AdapterStore` (:mod:`vpeft.serve.store`): the delta folder, refusals, lazy loading, the LRU cache and pins;
  shared adapters run in one :class:`vpeft.multitask.MultiTaskModel` forward, the others on their own models.
- :class:`DynamicBatcher` (:mod:`vpeft.serve.batcher`): queued requests, batches formed within a deadline, grouped by
  what shares a forward.
- :func:`create_app` (:mod:`vpeft.serve.app`, needs ``pip install 'vpeft[serve]'``): the FastAPI application.
"""

from __future__ import annotations

from typing import Any

from .batcher import DynamicBatcher
from .store import OWN, SHARED, AdapterInfo, AdapterRefusedError, AdapterStore, CacheStats, check_adapter_id

__all__ = [
    "OWN",
    "SHARED",
    "AdapterInfo",
    "AdapterRefusedError",
    "AdapterStore",
    "CacheStats",
    "DynamicBatcher",
    "check_adapter_id",
    "create_app",
]


def create_app(*args: Any, **kwargs: Any):
    """:func:`vpeft.serve.app.create_app` (imported on use: FastAPI is an optional dependency)."""
    from .app import create_app as create

    return create(*args, **kwargs)
