"""Classification metrics accumulated on the device, and an atomic JSON writer for metric files."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..tasks.classification import ClassificationMeter, topk_correct

__all__ = ["ClassificationMeter", "json_safe", "topk_correct", "write_json_atomic"]


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` via a temporary file in the same folder and ``os.replace``.

    Readers never see a half-written file, even if the process is killed mid-write. Non-finite floats are
    written as ``null`` so the file stays strict JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(json_safe(obj), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
