"""Classification metrics accumulated on the device, and an atomic JSON writer for metric files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write
from ..tasks.classification import ClassificationMeter, topk_correct

__all__ = ["ClassificationMeter", "json_safe", "topk_correct", "write_json_atomic"]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`vpeft.files.atomic_write`).

    Readers never see a half-written file, even if the process is killed mid-write; a failed write is a
    :class:`~vpeft.files.WriteError` naming ``path`` and leaves the previous file. Non-finite floats are written
    as ``null`` so the file stays strict JSON.
    """
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"  # a bad value fails before any file
    atomic_write(path, lambda tmp: _dump(text, tmp))


def _dump(text: str, tmp: Path) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf; also numpy and 0-d torch scalars) replaced by ``None``.

    Everything vpeft writes as JSON goes through this with ``allow_nan=False``: the files are strict JSON.
    """
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_safe(obj.item())
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return json_safe(item())
    return obj
