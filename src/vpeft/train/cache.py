"""Feature caching: compute a frozen prefix of the backbone once and train the rest on cached features.

When a method leaves the first blocks of a backbone untouched (linear probe: everything before the head;
partial-k: all but the last k blocks) and the data has no random augmentation (the VTAB-1k protocol), the
prefix produces the same output for a sample in every epoch. :func:`cached_training_setup` runs it once
over the training (and validation) data and returns a *suffix model* (a view sharing the original
modules, so the trained tensors are the original model's and :func:`vpeft.save` works unchanged) and
loaders over the cached features that yield batches in exactly the order the original loaders would::

    setup = cached_training_setup(model, train_loader, val_loader, device="cuda")
    result = train(setup.model, setup.train_loader, cfg, val_loader=setup.val_loader, device="cuda")

The training loop itself is untouched: it trains whatever model it is given on whatever ``(input, target)``
batches it is given. Every epoch after the first then costs only the suffix.

What is cached:

* nothing but the classification head is touched (linear probe; any backbone whose family gives ``pre_logits``,
  every timm family): the pre-logits features, one vector per sample;
* a ViT-family backbone (its :class:`~vpeft.arch.Family` gives ``tokens`` / ``finish``: timm ``VisionTransformer``)
  whose embedding and first ``k`` blocks are untouched: the tokens after block ``k - 1``; the suffix runs blocks
  ``k..``, the final norm and the head;
* a task model whose whole backbone is untouched and which offers a ``cache_split()`` (the segmentation model on a
  ViT: the decoder-only baseline): the backbone's stacked feature maps; the suffix is the decoder.

"Untouched" means: no parameter requires a gradient, no vpeft wrapper (other than the BatchNorm-statistics
pin) inside, no dropout / drop-path / patch-dropout that is active in training (its output
would differ every epoch) and no BatchNorm computing batch statistics. Random *data augmentation* cannot be
detected: caching is only correct for loaders without it (the caller's responsibility; the cache holds
the one view of each sample seen by the caching pass).

Memory and disk: features are kept in memory up to ``max_memory_bytes`` (default 2 GiB), else written to a
memory-mapped ``.npy`` file under ``cache_dir`` (a temporary folder removed with the dataset when not
given); the free disk space is checked first.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from vpeft._modules import BATCH_NORMS, DROPOUTS
from vpeft.arch import Family, get_family, get_spec
from vpeft.errors import ConfigError, DataError, UnsupportedBackboneError

__all__ = [
    "CachedSetup",
    "FeatureDataset",
    "FrozenSplit",
    "cache_features",
    "cached_training_setup",
    "frozen_split",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = 2 << 30


# ---- which prefix is frozen -------------------------------------------------------------------------------
def _subtree(*modules: nn.Module) -> list[nn.Module]:
    return [m for root in modules for m in root.modules()]


def _random_in_training(m: nn.Module) -> bool:
    """Dropout, timm DropPath / PatchDropout (and open_clip's PatchDropout) with a non-zero rate."""
    if isinstance(m, DROPOUTS):
        return m.p > 0
    return bool(getattr(m, "drop_prob", 0.0) or (type(m).__name__ == "PatchDropout" and getattr(m, "prob", 0.0)))


def _frozen_and_deterministic(modules: Iterable[nn.Module]) -> bool:
    """No trainable parameter, vpeft wrapper (but the BatchNorm pin), random layer or live BatchNorm.

    Forward hooks are not visible through a public torch API: vpeft itself keeps none on a model it trains (the
    dense-feature hooks live for one forward pass), and a user's own persistent hook inside the frozen prefix would
    run once per sample while caching instead of once per step -- do not combine such hooks with the cache.
    """
    from vpeft.layers import FrozenStatsNorm, Wrapper

    modules = list(modules)
    pinned = {id(m.base_layer) for m in modules if isinstance(m, FrozenStatsNorm)}
    for m in modules:
        if isinstance(m, Wrapper) and not isinstance(m, FrozenStatsNorm):
            return False
        if _random_in_training(m):
            return False
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            return False
        if isinstance(m, BATCH_NORMS) and id(m) not in pinned:
            return False
    return True


class _PreLogits(nn.Module):
    """The frozen part of a head-only model: the features its family says the classifier reads."""

    def __init__(self, model: nn.Module, family: Family) -> None:
        super().__init__()
        self.model, self.family = model, family

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.family.pre_logits(self.model, x)


class _TokenPrefix(nn.Module):
    """The token embedding and the first ``k`` blocks of a ViT-family backbone (its own modules, its own order)."""

    def __init__(self, model: nn.Module, family: Family, k: int) -> None:
        super().__init__()
        self.model, self.family, self.k = model, family, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.family.tokens(self.model, x)
        for name in self.family.spec(self.model).blocks[: self.k]:
            x = self.model.get_submodule(name)(x)
        return x


class _TokenSuffix(nn.Module):
    """Blocks ``k..`` and the family's ``finish`` (final norm, head), fed with cached tokens."""

    def __init__(self, model: nn.Module, family: Family, k: int) -> None:
        super().__init__()
        self.model, self.family, self.k = model, family, k

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for name in self.family.spec(self.model).blocks[self.k :]:
            tokens = self.model.get_submodule(name)(tokens)
        return self.family.finish(self.model, tokens)


@dataclasses.dataclass
class FrozenSplit:
    """``model(x) == suffix(prefix(x))``, with ``prefix`` frozen and deterministic.

    Attributes:
        prefix: the frozen part (runs once per sample).
        suffix: the rest (what is trained); shares the model's modules.
        depth: ``"pre_logits"`` (only the head is trained), ``"backbone"`` (a task model's whole backbone), or the
            number of leading blocks cached.
    """

    prefix: nn.Module
    suffix: nn.Module
    depth: int | str


def frozen_split(model: nn.Module) -> FrozenSplit | None:
    """The largest frozen, deterministic prefix of ``model`` worth caching, or ``None`` if there is none.

    Raises:
        ConfigError: ``model`` has no timm ``forward_features`` / ``forward_head`` / ``get_classifier``.
    """
    split = getattr(model, "cache_split", None)  # a task model with a decoder (vpeft.tasks.TaskModel)
    if callable(split) and hasattr(model, "backbone") and hasattr(model, "decoder"):
        parts = split()
        if parts is None or not _frozen_and_deterministic(model.backbone.modules()):
            return None
        return FrozenSplit(parts[0], parts[1], "backbone")
    try:
        family = get_family(model)
        head = family.head(model)
    except UnsupportedBackboneError:
        family, head = None, None
    if family is None or head is None:
        raise ConfigError(f"feature caching needs a backbone with a classifier of a known family, got {type(model)}")
    in_head = {id(m) for m in head.modules()}
    frozen_body = _frozen_and_deterministic(m for m in model.modules() if id(m) not in in_head)
    if frozen_body and not family.random_in_training(model) and _supports(family, "pre_logits", model):
        return FrozenSplit(_PreLogits(model, family), head, "pre_logits")
    stem = family.token_stem(model)
    if not stem or not _frozen_and_deterministic([model, *_subtree(*stem)]):  # the root: own tokens, position
        return None
    k = 0
    for name in get_spec(model).blocks:
        if not _frozen_and_deterministic(_subtree(model.get_submodule(name))):
            break
        k += 1
    if k == 0:
        return None
    return FrozenSplit(_TokenPrefix(model, family, k), _TokenSuffix(model, family, k), k)


def _supports(family: Family, capability: str, model: nn.Module) -> bool:
    """Whether ``family`` overrides ``capability`` (a :class:`Family` method) for ``model``'s kind of backbone."""
    return getattr(type(family), capability) is not getattr(Family, capability)


# ---- the cache --------------------------------------------------------------------------------------------
class FeatureDataset(Dataset):
    """``(features[i], targets[i])`` from a tensor in memory or a memory-mapped ``.npy`` file."""

    def __init__(self, features: torch.Tensor | np.ndarray, targets: torch.Tensor, path: Path | None = None) -> None:
        self.features, self.targets, self.path = features, targets, path

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features[i]
        return (torch.from_numpy(np.array(f)) if isinstance(f, np.ndarray) else f), self.targets[i]


def _storage(n: int, shape: tuple[int, ...], dtype: torch.dtype, max_memory: int, cache_dir: str | Path | None):
    nbytes = n * int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes <= max_memory:
        return torch.empty((n, *shape), dtype=dtype), None, None
    owned = cache_dir is None
    folder = Path(tempfile.mkdtemp(prefix="vpeft-features-") if owned else cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if nbytes > free - (256 << 20):
        raise DataError(
            f"feature cache needs {nbytes / 2**30:.2f} GiB on disk but {folder} has {free / 2**30:.2f} GiB free; "
            "pass another cache_dir or a larger max_memory_bytes"
        )
    path = Path(tempfile.mkstemp(suffix=".npy", prefix="features-", dir=folder)[1])
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(n, *shape))
    logger.info("feature cache: %.2f GiB > %.2f GiB in memory: on disk at %s", nbytes / 2**30, max_memory / 2**30, path)
    return array, path, folder if owned else None


@torch.no_grad()
def cache_features(
    prefix: nn.Module,
    loader: DataLoader,
    device: str | torch.device = "cpu",
    *,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> FeatureDataset:
    """Run ``prefix`` once over ``loader.dataset`` in index order and keep the outputs (sample ``i`` at index ``i``).

    The prefix runs in training mode (as it would inside the training step; :func:`frozen_split` has
    checked that this is deterministic) without autograd, in batches of ``loader.batch_size``.

    Raises:
        DataError: the dataset is empty, or the cache does not fit on disk.
    """
    device = torch.device(device)
    dataset = loader.dataset
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("cannot cache features of an empty dataset")
    batch_size, workers = loader.batch_size or 1, loader.num_workers
    ordered = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=loader.collate_fn)
    was_training = prefix.training
    prefix.train()
    features, targets, path, owned, pos = None, None, None, None, 0
    try:
        for images, target in tqdm(ordered, desc="caching features", disable=not progress, leave=False):
            out = prefix(images.to(device, non_blocking=True)).cpu()
            if features is None:
                features, path, owned = _storage(n, tuple(out.shape[1:]), out.dtype, max_memory_bytes, cache_dir)
            stop = pos + len(out)
            features[pos:stop] = out.numpy() if isinstance(features, np.ndarray) else out
            target = torch.as_tensor(target)
            if targets is None:  # class indices, or masks for dense tasks
                targets = torch.empty((n, *target.shape[1:]), dtype=target.dtype)
            targets[pos:stop] = target
            pos = stop
    finally:
        prefix.train(was_training)
    if isinstance(features, np.memmap):
        features.flush()
    result = FeatureDataset(features, targets, path)
    if owned is not None:
        weakref.finalize(result, shutil.rmtree, owned, True)
    return result


# ---- plugging it into training ----------------------------------------------------------------------------
@dataclasses.dataclass
class CachedSetup:
    """What :func:`cached_training_setup` returns: train ``model`` on ``train_loader`` as usual.

    Attributes:
        model: the suffix (shares the original model's modules and trainable tensors).
        train_loader: cached features in the original loader's batch order (same sampler, same generator).
        val_loader: cached validation features (``None`` without a validation loader).
        depth: ``"pre_logits"`` or the number of cached leading blocks.
        nbytes: bytes of cached features (train + val); on_disk: whether any of them is memory-mapped.
    """

    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader | None
    depth: int | str
    nbytes: int
    on_disk: bool


def _like(loader: DataLoader, dataset: FeatureDataset) -> DataLoader:
    shuffle = isinstance(loader.sampler, RandomSampler)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        shuffle=shuffle,
        drop_last=loader.drop_last,
        generator=loader.generator if shuffle else None,
    )


def cached_training_setup(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    device: str | torch.device = "cpu",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> CachedSetup:
    """Cache the frozen prefix of an adapted ``model`` over the loaders; see the module docstring.

    Call it before :func:`vpeft.train.train` (which seeds the RNGs, so the cached loader's shuffling equals
    the original loader's). The loaders must not apply random augmentation.

    Raises:
        ConfigError: nothing of ``model`` can be cached (a method touches the first block, or the prefix is
            random in training), or the loaders are not map-style ``DataLoader``\\ s.
    """
    loaders: Iterable[Any] = [train_loader] if val_loader is None else [train_loader, val_loader]
    if not all(isinstance(ld, DataLoader) for ld in loaders):
        raise ConfigError("feature caching needs torch DataLoaders over map-style datasets")
    split = frozen_split(model)
    if split is None:
        raise ConfigError(
            "nothing to cache: the method changes the first block (or the embedding), or the frozen prefix has "
            "dropout / drop-path / batch statistics active in training; train without the cache"
        )
    device = torch.device(device)
    model.to(device)
    kwargs = {"max_memory_bytes": max_memory_bytes, "cache_dir": cache_dir, "progress": progress}
    train_set = cache_features(split.prefix, train_loader, device, **kwargs)
    val_set = cache_features(split.prefix, val_loader, device, **kwargs) if val_loader is not None else None
    sets = [s for s in (train_set, val_set) if s is not None]
    logger.info(
        "feature cache: prefix %s, %.1f MiB%s",
        split.depth,
        sum(s.nbytes for s in sets) / 2**20,
        " (on disk)" if any(s.on_disk for s in sets) else "",
    )
    return CachedSetup(
        model=split.suffix,
        train_loader=_like(train_loader, train_set),
        val_loader=_like(val_loader, val_set) if val_loader is not None and val_set is not None else None,
        depth=split.depth,
        nbytes=sum(s.nbytes for s in sets),
        on_disk=any(s.on_disk for s in sets),
    )
