"""Data-parallel training with torch DDP under ``torchrun``: process group, sharded loaders, rank-0-only output.

A run is distributed when the environment says so (``WORLD_SIZE`` > 1, as ``torchrun`` sets it, with ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) or when a process group of more than one process is already
initialised. Otherwise :func:`session` yields ``None`` and nothing here runs: the single-process path is untouched.

**Batch semantics.** A loader's ``batch_size`` (``TrainConfig.batch_size``) is the *global* batch. Every rank
iterates the same single-process sampler (same seeded generator, hence the same order) and
:class:`ShardedBatchSampler` hands each rank a contiguous slice of every global batch, so the union of the ranks'
micro-batches at each step *is* the single-process batch. The training loop sums the per-sample losses and scales
them by ``world_size / global_batch``; DDP's gradient averaging then gives exactly the single-process mean gradient,
and a ``torchrun`` job and a single-process job with the same config are the same experiment (up to floating-point
summation order).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

from vpeft.errors import ConfigError, DataError

__all__ = [
    "DistContext",
    "ShardedBatchSampler",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "current",
    "is_main_process",
    "main_first",
    "session",
    "shard_loader",
    "wrap_ddp",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run.

    Attributes:
        rank: Global rank (0 is the main process: it logs and writes every file).
        local_rank: Rank on this node (picks the GPU).
        world_size: Number of processes (> 1).
        device: Where this rank computes (``cuda:<local_rank>`` for a bare ``"cuda"``).
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(
                f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for a distributed run but {name} is not set; "
                "launch with torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an int >= 0") from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={raw!r} must be an int >= 0")
    return value


def _resolve_device(device: str | torch.device, local_rank: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # one GPU per local rank
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def current(device: str | torch.device = "cpu") -> DistContext | None:
    """The context of the initialised process group, or ``None`` without one (or with a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    rank = dist.get_rank()
    local_rank = _env_int("LOCAL_RANK", rank)
    return DistContext(rank, local_rank, dist.get_world_size(), _resolve_device(device, local_rank))


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process): the one that should print and write files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


@contextmanager
def session(device: str | torch.device = "cpu") -> Iterator[DistContext | None]:
    """Join the distributed run for the duration of the block; yield ``None`` in a single-process run.

    If no process group is initialised and ``WORLD_SIZE`` > 1, initialise one (``nccl`` for a CUDA device, else
    ``gloo``; address and port from ``MASTER_ADDR`` / ``MASTER_PORT``), and on leaving the block wait at a barrier
    (so rank 0's files are complete when any rank returns) and destroy it. A group initialised by the caller is
    used as is and left alone, so sessions nest (:func:`vpeft.run.finetune` holds one around :func:`train`).

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 without ``RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``, or a malformed value.
    """
    ctx = current(device)
    if ctx is not None or (dist.is_available() and dist.is_initialized()):
        yield ctx
        return
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 2:
        yield None
        return
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; launch with torchrun")
    dev = _resolve_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    ctx = DistContext(rank, local_rank, world_size, dev)
    if ctx.is_main:
        logger.info("distributed run: %d processes, backend %s", world_size, backend)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        if finished:  # after an error the other ranks may never arrive: do not wait for them
            barrier(ctx)
        dist.destroy_process_group()


def barrier(ctx: DistContext | None) -> None:
    """Wait for every rank (no-op without a distributed context)."""
    if ctx is None:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


@contextmanager
def main_first(ctx: DistContext | None) -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (for steps that may write caches or exports)."""
    if ctx is not None and not ctx.is_main:
        barrier(ctx)
    yield
    if ctx is not None and ctx.is_main:
        barrier(ctx)


def all_reduce_sum(values: Sequence[float | torch.Tensor], ctx: DistContext) -> list[float]:
    """Sum scalars over all ranks (one float64 all-reduce on the rank's device)."""
    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(ctx.device).reshape(()) for v in values])
    dist.all_reduce(flat)
    return flat.tolist()


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (every rank must call it)."""
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap ``model`` (already on ``ctx.device``) in DistributedDataParallel.

    DDP broadcasts every parameter and buffer from rank 0 when it is built, so randomly initialised trainable
    tensors start identical on all ranks, and it registers gradient hooks only for parameters with
    ``requires_grad=True``: frozen weights are never synchronised. ``find_unused_parameters`` is only needed by
    models whose trainable parameters are not all used in every step (e.g. a supernet sampling sub-networks).
    """
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's contiguous slice of every global batch drawn from a single-process sampler.

    Each global batch (``batch_size`` consecutive indices of ``sampler``) is split into ``world_size`` contiguous
    slices whose sizes differ by at most one; rank ``r`` gets slice ``r``. Every rank must iterate an identical
    sampler (same seeded generator). A slice can only be empty in a last batch smaller than ``world_size``: with
    ``pad_empty`` the rank then gets the batch's first index as a stand-in (the training loop gives it zero
    weight, see :meth:`shard_sizes`), so every rank runs the same number of forward/backward passes; without it,
    the empty slice is skipped (evaluation needs no lock-step).

    Args:
        sampler: The single-process sampler (e.g. a DataLoader's ``RandomSampler``); must have a ``len()``.
        batch_size: The global batch size.
        drop_last: Drop the last incomplete global batch.
        rank: This rank.
        world_size: Number of ranks.
        pad_empty: Replace an empty slice with a zero-weight stand-in index.
    """

    def __init__(
        self, sampler: Sampler[int], batch_size: int, drop_last: bool, rank: int, world_size: int, pad_empty: bool
    ) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.world_size, self.pad_empty = rank, world_size, pad_empty
        self.total = len(sampler)  # type: ignore[arg-type]
        self.num_global = self.total // batch_size if drop_last else math.ceil(self.total / batch_size)

    def _bounds(self, n: int) -> tuple[int, int]:
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def shard_sizes(self, i: int) -> tuple[int, int]:
        """``(samples of this rank, samples of all ranks)`` in the ``i``-th (0-based) global batch.

        The first is 0 for a zero-weight stand-in batch.
        """
        n = min(self.batch_size, self.total - i * self.batch_size)
        start, end = self._bounds(n)
        return end - start, n

    def __len__(self) -> int:
        if self.pad_empty or not self.num_global:
            return self.num_global
        return self.num_global - int(self.shard_sizes(self.num_global - 1)[0] == 0)

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        seen = 0
        for index in self.sampler:
            batch.append(index)
            seen += 1
            if len(batch) == self.batch_size:
                yield self._slice(batch)
                batch = []
        if seen != self.total:
            raise DataError(f"the sampler yielded {seen} indices but its len() is {self.total}")
        if batch and not self.drop_last:
            part = self._slice(batch)
            if part:
                yield part

    def _slice(self, batch: list[int]) -> list[int]:
        start, end = self._bounds(len(batch))
        if start < end:
            return batch[start:end]
        return batch[:1] if self.pad_empty else []


def _check_shardable(loader: Any, ctx: DistContext, what: str, train: bool) -> None:
    """Refuse a loader :func:`shard_loader` cannot slice: not a map-style DataLoader with a batch size, already
    distributed, or (``train``) a global batch the world size does not divide."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None or isinstance(loader.dataset, IterableDataset):
        raise ConfigError(
            f"under DDP the {what} loader must be a torch DataLoader over a map-style dataset built with "
            f"batch_size=<global batch> (vpeft shards each batch over the {ctx.world_size} processes), got "
            f"{type(loader).__name__}" + (" with a custom batch_sampler" if isinstance(loader, DataLoader) else "")
        )
    if isinstance(loader.sampler, DistributedSampler):
        raise ConfigError(
            f"the {what} loader already uses a DistributedSampler; under DDP pass the single-process loader "
            "(batch_size = the global batch): vpeft gives each process its slice of every batch"
        )
    batch_size = loader.batch_size
    if train and batch_size % ctx.world_size:
        lower = batch_size - batch_size % ctx.world_size
        options = ", ".join(str(b) for b in (lower, lower + ctx.world_size) if b > 0)
        raise ConfigError(
            f"TrainConfig.batch_size (the train loader's batch_size) is the global batch under DDP and must be "
            f"divisible by the number of processes {ctx.world_size}, got {batch_size}; use e.g. {options}"
        )


def shard_loader(loader: Any, ctx: DistContext, *, train: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over the same dataset that yields this rank's slices of ``loader``'s (global) batches.

    Keeps the loader's sampler, generator, collate function and worker settings, so all ranks draw the same
    order as a single-process run with ``loader``. A shuffling loader without its own generator (whose order
    would come from the global RNG, which ranks may consume differently) gets one seeded with ``seed``.

    Args:
        loader: A DataLoader over a map-style dataset, built with ``batch_size`` = the global batch.
        ctx: The distributed context.
        train: A training loader: the batch size must be divisible by the world size, and empty slices are
            padded with a zero-weight stand-in (see :class:`ShardedBatchSampler`).
        seed: Seed of the generator given to an unseeded ``RandomSampler``.

    Raises:
        ConfigError: ``loader`` is not such a DataLoader, already uses a ``DistributedSampler``, or (``train``) its
            batch size is not divisible by the world size.
    """
    what = "train" if train else "evaluation"
    _check_shardable(loader, ctx, what, train)
    sampler, batch_size = loader.sampler, loader.batch_size
    if isinstance(sampler, RandomSampler) and sampler.generator is None:
        sampler = RandomSampler(
            loader.dataset,  # type: ignore[arg-type]
            replacement=sampler.replacement,
            num_samples=sampler.num_samples,
            generator=torch.Generator().manual_seed(seed),
        )
        if ctx.is_main:
            logger.info("the %s loader shuffles without a generator; DDP ranks share one seeded with %d", what, seed)
    batches = ShardedBatchSampler(sampler, batch_size, loader.drop_last, ctx.rank, ctx.world_size, pad_empty=train)
    return DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )
