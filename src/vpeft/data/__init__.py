"""Datasets and transforms: VTAB-1k task folders, plain image folders, scikit-learn digits, moving digits.

Typical use::

    from vpeft.data import build_dataloader, build_transform, default_data_root, load_split

    tf = build_transform(model)  # VTAB protocol: resize to the model's input size, normalise
    train_ds = load_split(default_data_root(), "cifar10", "train800", transform=tf)
    loader = build_dataloader(train_ds, batch_size=64, shuffle=True, seed=0)
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vpeft.data.digits import DIGITS_SPLIT_SIZES, ensure_digits_task
from vpeft.data.moving_digits import ensure_moving_digits_task
from vpeft.data.segmentation import SegmentationDataset, is_segmentation_folder, load_segmentation_split, save_overlay
from vpeft.data.transforms import ToRGB, build_transform, resolve_input_size
from vpeft.data.vtab import (
    IMG_EXTENSIONS,
    SPLITS,
    ImageFolderDataset,
    ImageListDataset,
    VTABTask,
    default_data_root,
    list_tasks,
    load_split,
    read_split_list,
)
from vpeft.errors import ConfigError

__all__ = [
    "DIGITS_SPLIT_SIZES",
    "GENERATED_TASKS",
    "IMG_EXTENSIONS",
    "SPLITS",
    "ImageFolderDataset",
    "ImageListDataset",
    "SegmentationDataset",
    "ToRGB",
    "VTABTask",
    "build_dataloader",
    "build_transform",
    "default_data_root",
    "ensure_digits_task",
    "ensure_moving_digits_task",
    "is_segmentation_folder",
    "list_tasks",
    "load_segmentation_split",
    "load_split",
    "read_split_list",
    "resolve_input_size",
    "save_overlay",
]

#: tasks vpeft exports offline on first use: name -> ``ensure(root)`` (writes ``root/<name>``, atomic, idempotent)
GENERATED_TASKS = {"digits": ensure_digits_task, "moving_digits": ensure_moving_digits_task}


def _seed_worker(worker_id: int) -> None:
    """Seed python and numpy in a worker from the per-worker torch seed (set by the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """Wrap a dataset in a DataLoader whose shuffling (and worker seeding) is reproducible.

    Args:
        dataset: Any map-style dataset returning ``(image, label)``.
        batch_size: Samples per batch (>= 1).
        shuffle: Reshuffle every epoch.
        num_workers: Worker processes (0 loads in the main process).
        seed: Seeds the loader's own ``torch.Generator``, so the order does not depend on the global RNG.
            ``None`` uses the global torch RNG.
        drop_last: Drop the last incomplete batch.

    Returns:
        The DataLoader.

    Raises:
        ConfigError: ``batch_size`` < 1 or ``num_workers`` < 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
