"""Predicting a dataset's items in batches, for the pictures ``vpeft eval --save-masks`` writes.

Shared by the segmentation overlays and the detection drawings: both need the stored item behind any ``Subset``
wrappers (to read the original image at its own resolution) and the model's evaluation output per item.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Range

__all__ = ["base_dataset", "first_items", "predict_items", "unique_png"]


def base_dataset(dataset: Dataset) -> tuple[Any, list[int]]:
    """``(the dataset under any Subset wrappers, the indices into it of dataset's items in order)``."""
    indices = list(range(len(dataset)))  # type: ignore[arg-type]
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def first_items(indices: list[int], limit: int | None, what: str) -> list[int]:
    """The first ``limit`` of ``indices`` (all for ``None``); a ``limit`` that is not an int >= 0 is refused rather
    than used as a Python slice (``-1`` would drop the last item)."""
    if limit is None:
        return indices
    Range.int(0).check(f"{what}: limit", limit)
    return indices[:limit]


def predict_items(
    model: nn.Module, base: Any, indices: Sequence[int], device: str | torch.device, batch_size: int
) -> Iterator[tuple[int, Any]]:
    """``(index, the model's output for base[index])`` in order, batched, in eval mode without autograd.

    The model's train/eval mode is restored afterwards, also when the caller stops early or an error is raised.
    """
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            x = torch.stack([base[i][0] for i in chunk]).to(device)
            with torch.inference_mode():
                outputs = model(x)
            yield from zip(chunk, outputs)
    finally:
        model.train(was_training)


def unique_png(stem: str, used: set[str]) -> str:
    """``<stem>.png``, or ``<stem>-2.png``, ``<stem>-3.png`` ... when a joined split repeats a name; recorded in
    ``used``."""
    name, n = f"{stem}.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}.png"
    used.add(name)
    return name
