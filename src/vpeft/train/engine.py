"""The one training loop: AdamW with warm-up + cosine schedule, label smoothing, bf16, gradient accumulation.

The loop is method-agnostic: whatever a PEFT method left with ``requires_grad=True`` is trained; everything else
is untouched (no optimizer state is allocated for frozen tensors). The model is put in ``train()`` mode as a
whole; deciding how frozen parts behave (BatchNorm statistics, dropout) is the method layer's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from vpeft.arch import get_family, get_spec, supported_families
from vpeft.arch.recompute import HALF
from vpeft.errors import CheckpointError, ConfigError, DataError, UnsupportedBackboneError, suggest
from vpeft.tasks import ClassificationTask, Meter, Task, TaskModel
from vpeft.train import checkpoint as ckpt
from vpeft.train import distributed as dist_utils
from vpeft.train.distributed import DistContext
from vpeft.train.metrics import write_json_atomic

__all__ = [
    "NO_DECAY_ATTR",
    "Callback",
    "TrainConfig",
    "TrainResult",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "mark_no_decay",
    "resolve_task",
    "set_seed",
    "train",
]

logger = logging.getLogger(__name__)

NO_DECAY_ATTR = "_vpeft_no_decay"
"""Set this attribute to ``True`` on an ``nn.Parameter`` to exclude it from weight decay."""

Callback = Callable[[dict[str, Any]], "bool | None"]
"""Called with each epoch's metrics record after it is stored; returning ``True`` stops training."""

_MAX_SEED = 2**32 - 1


def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"TrainConfig.{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    allowed = f"an int in [{lo}, {hi}]" if hi is not None else f"an int >= {lo}"
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise _fail(name, value, allowed)


def _check_float(
    name: str, value: Any, lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    allowed = f"a number in {left}{lo}, {hi}{right}" if hi is not None else f"a number {'>' if lo_open else '>='} {lo}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, value, allowed)
    too_low = value <= lo if lo_open else value < lo
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        raise _fail(name, value, allowed)
    return float(value)


MEMORY_MODES = ("default", "recompute", "half")
"""The values of :attr:`TrainConfig.memory`."""


def _check_memory(memory: Any, grad_checkpointing: bool) -> None:
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        raise _fail("memory", memory, f"one of {', '.join(MEMORY_MODES)}")
    if memory != "default" and grad_checkpointing:
        raise ConfigError(
            f"TrainConfig.memory={memory!r} and grad_checkpointing=True both recompute the blocks; set one"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes:
        epochs: Passes over the training loader (>= 1).
        lr: Peak learning rate of AdamW (> 0).
        weight_decay: Decoupled weight decay for >= 2-D tensors not marked no-decay (>= 0).
        warmup_epochs: Linear warm-up length in epochs; fractions allowed (in [0, epochs]).
        batch_size: Batch size the caller should build the loaders with (the loop uses the loader as given).
            Under DDP (``torchrun``) it is the global batch: each of the ``W`` processes gets ``batch_size / W``
            samples of every batch, so it must be divisible by ``W``.
        label_smoothing: Cross-entropy label smoothing (in [0, 1)).
        grad_accum: Micro-batches per optimizer step (>= 1).
        bf16: Run the forward pass under ``torch.autocast(dtype=torch.bfloat16)``. Off by default: on CPUs
            without native bf16 it is 5-22x slower (``benchmarks/bench_options.py``); try it on GPUs.
        channels_last: NHWC memory format for the weights and 4-D inputs. ``None`` (default): on for CNN
            backbones, where it measured 0.94x the step time on CPU, off for transformers (no convolutions
            after the patch embedding).
        compile: Train through ``torch.compile(model)``. Off by default: on CPU it measured 1.03-1.05x the step
            time after a 1-2 minute compilation.
        grad_checkpointing: Recompute block activations in backward (timm ``set_grad_checkpointing``, Hugging
            Face ``gradient_checkpointing_enable``): 0.22-0.35x the peak training memory for 1.28-1.66x the
            step time on CPU. Off by default (a memory-for-time trade).
        memory: ``"default"``: autograd keeps what each op saves for backward. ``"recompute"``: every block of
            the backbone (its family's spec) runs under non-reentrant activation checkpointing, keeping only
            its input; backward recomputes it. Works with every method (their tensors live inside the blocks)
            and gives bit-identical losses and gradients. ViT-S/16, batch 16, CPU (``benchmarks/bench_step.py
            --memory recompute``): saved activations 0.11-0.12x the activation-gradient limit's and peak memory
            0.24-0.36x, for 1.3-1.5x the default step time (one more forward of the blocks). ``"half"``: the
            first 2/3 of the blocks only (:data:`vpeft.arch.recompute.HALF`; 8 of ViT-S's 12): saved activations
            and peak memory <= 0.5x the limit's for about 2/3 of ``"recompute"``'s extra time, also bit-identical.
            Neither is combined with ``grad_checkpointing`` (the library's own switch).
        seed: Seed for python, numpy and torch at the start of training (in [0, 2**32 - 1]).
        min_lr: Learning rate at the end of the cosine schedule (in [0, lr]).
        max_grad_norm: Clip the global gradient norm to this value; ``None`` disables clipping.
        log_every: Refresh the progress bar and emit a debug log line every this many optimizer steps (0: never).
        checkpoint_every: With an ``out_dir``, write a resumable training checkpoint (``checkpoint.pt``) atomically
            every this many epochs and after the last (0: never); :func:`train` with ``resume=True`` continues from it.
        feature_cache: In :func:`vpeft.run.finetune` (``vpeft train``, ``vpeft bench``): train on cached outputs of
            the frozen prefix of the model when that is exact -- the method leaves the embedding and the first
            blocks untouched (linear probe, partial-k) and the training data has no random augmentation; the
            results equal an uncached run's. :func:`train` itself trains whatever model and loader it is given.
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    batch_size: int = 64
    label_smoothing: float = 0.0
    grad_accum: int = 1
    bf16: bool = False
    channels_last: bool | None = None
    compile: bool = False
    grad_checkpointing: bool = False
    memory: str = "default"
    seed: int = 0
    min_lr: float = 1e-8
    max_grad_norm: float | None = None
    log_every: int = 10
    checkpoint_every: int = 1
    feature_cache: bool = True

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("grad_accum", self.grad_accum, 1)
        _check_int("seed", self.seed, 0, _MAX_SEED)
        _check_int("log_every", self.log_every, 0)
        _check_int("checkpoint_every", self.checkpoint_every, 0)
        for name in ("bf16", "compile", "grad_checkpointing", "feature_cache"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, getattr(self, name), "a bool")
        _check_memory(self.memory, self.grad_checkpointing)
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise _fail("channels_last", self.channels_last, "a bool or None (automatic: on for CNNs)")
        self._set("lr", _check_float("lr", self.lr, 0.0, 1e30, lo_open=True))  # beyond: float32 overflow
        self._set("weight_decay", _check_float("weight_decay", self.weight_decay, 0.0))
        self._set("warmup_epochs", _check_float("warmup_epochs", self.warmup_epochs, 0.0, float(self.epochs)))
        self._set("label_smoothing", _check_float("label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True))
        self._set("min_lr", _check_float("min_lr", self.min_lr, 0.0, self.lr))
        if self.max_grad_norm is not None:
            self._set("max_grad_norm", _check_float("max_grad_norm", self.max_grad_norm, 0.0, lo_open=True))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. parsed JSON); missing keys take their defaults.

        Raises:
            ConfigError: An unknown key (the message lists the valid keys) or an invalid value.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                raise ConfigError(suggest(str(key), valid, "TrainConfig key"))
        return cls(**dict(data))


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        history: One metrics record per epoch (see :func:`train`).
        final: The last epoch's record (train loss/top-1, and validation metrics when a val loader was given).
        total_time_s: Wall time of the whole run, evaluation included.
        steps: Optimizer steps taken.
        stopped_early: Whether a callback stopped training before ``cfg.epochs``.
        epochs_run: The epochs this call trained (a resumed run: only those after its checkpoint).
        steps_run: The optimizer steps this call took (``steps`` counts the checkpointed ones too).
        resumed_after: The checkpoint's epoch this call continued from (``None``: trained from epoch 1).
        resumes: Every resume of the run so far, ``{after_epoch, step}`` each (also in ``metrics.json``).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    total_time_s: float = 0.0
    steps: int = 0
    stopped_early: bool = False
    epochs_run: list[int] = field(default_factory=list)
    steps_run: int = 0
    resumed_after: int | None = None
    resumes: list[dict[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields."""
        return dataclasses.asdict(self)


def resolve_task(model: nn.Module, task: Task | None = None) -> Task:
    """The task a model trains for: ``task`` if given, a :class:`~vpeft.tasks.TaskModel`'s own, else classification."""
    if task is not None:
        return task
    return model.task if isinstance(model, TaskModel) else ClassificationTask()


def set_seed(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (all devices).

    This does not switch torch to deterministic kernels; on CPU the loop is bit-reproducible anyway.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mark_no_decay(param: nn.Parameter) -> nn.Parameter:
    """Exclude ``param`` from weight decay in :func:`build_optimizer` (for >= 2-D tensors such as prompt tokens)."""
    setattr(param, NO_DECAY_ATTR, True)
    return param


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` only.

    Parameters with ``requires_grad=False`` are not handed to the optimizer, so they get no state. Tensors with
    ``ndim <= 1`` (biases, norm weights, scales) and parameters marked with :func:`mark_no_decay` get no weight
    decay; all others get ``cfg.weight_decay``.

    Raises:
        ConfigError: The model has no trainable parameter.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or getattr(param, NO_DECAY_ATTR, False) else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError(
            "the model has no trainable parameters (requires_grad=True); apply a PEFT method or unfreeze the head"
        )
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    logger.debug("optimizer groups: %s", {g["name"]: sum(p.numel() for p in g["params"]) for g in groups})
    return torch.optim.AdamW(groups, lr=cfg.lr)


@dataclass(frozen=True)
class WarmupCosine:
    """LR multiplier for optimizer step ``step`` (0-based): linear warm-up, then cosine decay to ``floor``.

    ``step < warmup``: ``(step + 1) / warmup`` (the first step already moves; step ``warmup - 1`` uses the peak).
    Afterwards: ``floor + (1 - floor) * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (total - warmup)``,
    clamped to 1, so the multiplier is 1 right after warm-up and reaches ``floor`` after the last step.
    """

    warmup: int
    total: int
    floor: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Per-optimizer-step linear warm-up over ``cfg.warmup_epochs``, then cosine decay to ``cfg.min_lr``.

    Call ``scheduler.step()`` after every ``optimizer.step()``. ``min_lr`` is relative to ``cfg.lr``: every
    param group decays to ``min_lr / lr`` times its own initial learning rate.

    Args:
        optimizer: The optimizer, with its initial learning rates set.
        cfg: Supplies ``epochs``, ``warmup_epochs``, ``lr`` and ``min_lr``.
        steps_per_epoch: Optimizer steps per epoch (micro-batches / ``grad_accum``, rounded up).

    Raises:
        ConfigError: ``steps_per_epoch`` < 1.
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    return LambdaLR(optimizer, WarmupCosine(warmup=warmup, total=total, floor=cfg.min_lr / cfg.lr))


def _num_batches(loader: Iterable[Any]) -> int:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("train_loader must have a length (a DataLoader over a map-style dataset)") from None
    if n == 0:
        raise DataError("train_loader yields no batches (dataset empty, or smaller than batch_size with drop_last)")
    return n


@dataclass
class _Loop:
    """Mutable state of one :func:`train` call."""

    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    optimizer: torch.optim.AdamW
    scheduler: LambdaLR
    step: int = 0
    last_lr: float = 0.0
    task: Task = dataclasses.field(default_factory=ClassificationTask)
    dist: DistContext | None = None  # with it, ``model`` is the DDP wrapper and ``module`` the model it wraps
    module: nn.Module | None = None
    channels_last: bool = False  # 4-D input batches are converted to NHWC

    @property
    def main(self) -> bool:
        """Whether this process logs and writes files (rank 0, or the only process)."""
        return self.dist is None or self.dist.is_main

    def run_epoch(self, loader: Iterable[Any], epoch: int, progress: bool) -> dict[str, Any]:
        """Train one epoch; return the meter's statistics, ``lr`` and ``train_time_s``."""
        self.model.train()
        meter, n_batches, accum = self.task.new_meter(), len(loader), self.cfg.grad_accum  # type: ignore[arg-type]
        start, pending = time.perf_counter(), 0
        bar = tqdm(
            loader,
            total=n_batches,
            desc=f"epoch {epoch}/{self.cfg.epochs}",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for i, (images, targets) in enumerate(bar):
            group_size = min(accum, n_batches - (i // accum) * accum)
            if self.dist is None:
                loss, logits, targets = self._forward_backward(images, targets, group_size)
                meter.update(loss, logits, targets)
            else:
                sizes = loader.batch_sampler.shard_sizes(i)  # type: ignore[attr-defined]
                out = self._forward_backward_ddp(images, targets, group_size, sizes, pending + 1 == group_size)
                if out is not None:
                    meter.update(*out)
            pending += 1
            if pending == group_size:
                self._optimizer_step()
                pending = 0
                self._maybe_log(bar, meter, epoch)
        if pending:  # loader yielded fewer batches than len() announced
            self._optimizer_step()
        stats = self._stats(meter)
        self._check_finite(stats["loss"], epoch)
        return {**stats, "lr": self.last_lr, "train_time_s": time.perf_counter() - start}

    def _forward_backward(
        self, images: torch.Tensor, targets: torch.Tensor, group_size: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        images = self._images(images)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            # a tensor (timm), a ModelOutput (transformers), or the task model's (the task may pass the targets in)
            output = self.task.forward(self.model, images, targets)
        loss = self.task.loss(output, targets, label_smoothing=self.cfg.label_smoothing)
        (loss / group_size).backward()
        return loss.detach(), _detach(output), targets

    def _forward_backward_ddp(
        self, images: torch.Tensor, targets: torch.Tensor, group_size: int, sizes: tuple[int, int], sync: bool
    ) -> tuple[torch.Tensor, Any, torch.Tensor] | None:
        """One rank's share of a global micro-batch; ``sizes`` is ``(local, global)`` samples (local 0: stand-in).

        The rank's batch-mean loss times its sample count is scaled by ``world_size / global``, so DDP's average
        over ranks is the global batch mean (divided by ``group_size`` as in the single-process path). Gradients
        are all-reduced only on the last micro-batch of an accumulation group (``sync``).
        """
        assert self.dist is not None
        local, total = sizes
        images = self._images(images)
        targets = targets.to(self.device, non_blocking=True)
        with contextlib.nullcontext() if sync else self.model.no_sync():  # type: ignore[operator]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                output = self.task.forward(self.model, images, targets)
            loss_sum = self.task.loss(output, targets, label_smoothing=self.cfg.label_smoothing) * local
            scale = self.dist.world_size / (total * group_size) if local else 0.0  # a stand-in weighs nothing
            (loss_sum * scale).backward()
        if not local:
            return None
        return loss_sum.detach() / local, _detach(output), targets

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _stats(self, meter: Meter) -> dict[str, Any]:
        return meter.compute() if self.dist is None else _reduce_meter(meter, self.task, self.dist)

    def _optimizer_step(self) -> None:
        if self.cfg.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _maybe_log(self, bar: tqdm, meter: Meter, epoch: int) -> None:
        if not self.cfg.log_every or self.step % self.cfg.log_every:
            return
        stats = self._stats(meter)  # under DDP: global numbers, so every rank takes the same decision below
        self._check_finite(stats["loss"], epoch)
        if not self.main:
            return
        key = self.task.primary_metric
        bar.set_postfix({"loss": f"{stats['loss']:.4f}", key: f"{stats[key]:.3f}", "lr": f"{self.last_lr:.2e}"})
        logger.debug("epoch %d step %d: loss %.4f %s %.3f", epoch, self.step, stats["loss"], key, stats[key])

    def _check_finite(self, loss: float, epoch: int) -> None:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss} at epoch {epoch}, step {self.step} (lr {self.last_lr:.3e}); "
                "lower TrainConfig.lr, set max_grad_norm, or disable bf16"
            )


def train(
    model: nn.Module,
    train_loader: Iterable[Any],
    cfg: TrainConfig,
    *,
    val_loader: Iterable[Any] | None = None,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] | None = None,
    find_unused_parameters: bool = False,
    task: Task | None = None,
    resume: bool = False,
    run: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``train_loader``.

    Seeds everything with ``cfg.seed``, moves ``model`` to ``device``, then for each epoch: ``model.train()``,
    the task's loss (:meth:`vpeft.tasks.Task.loss`; classification: cross-entropy with ``cfg.label_smoothing``)
    under optional bf16 autocast, backward of ``loss / k`` where
    ``k`` is the number of micro-batches in the current accumulation group, an optimizer step (after optional
    gradient clipping) every ``cfg.grad_accum`` micro-batches and at the end of the epoch, and a scheduler step
    after every optimizer step. After each epoch the model is evaluated on ``val_loader`` (if given) and a record
    ``{epoch, train_loss, train_<metric>, lr, val_<metric>, val_loss, epoch_time_s, images_per_s, steps}`` is
    appended to the history, one ``train_``/``val_`` key per scalar metric of the task's meter (classification:
    ``train_top1``, ``val_top1``; ``lr`` is the rate used by the epoch's last step; ``val_*`` are ``None`` without a
    val loader; fractions in [0, 1]; ``images_per_s`` counts training images over training time only).
    With ``out_dir`` the file ``out_dir/metrics.json`` (``{config, history, steps, elapsed_s, complete, resumes}``) is
    rewritten atomically after every epoch.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the same call runs data-parallel (see :mod:`vpeft.train.distributed`):
    it joins (or initialises, and then destroys at the end) the process group, wraps ``model`` in
    DistributedDataParallel (only trainable parameters are synchronised), and gives each rank a contiguous slice
    of every batch of ``train_loader``, whose ``batch_size`` is the global batch (divisible by the world size).
    Validation is sharded the same way with the counts all-reduced; losses, metrics and the trained parameters
    equal a single-process run's up to floating-point summation order. Only rank 0 shows progress, logs and
    writes ``metrics.json``; every rank returns the same history (timings aside).

    Args:
        model: The model; parameters with ``requires_grad=True`` are trained.
        train_loader: Yields ``(inputs, targets)`` batches in the task's format and has a ``len()``.
        cfg: Hyper-parameters.
        task: What the model is trained for (loss, metrics); default: a TaskModel's own task, else classification.
        resume: Continue from ``out_dir/checkpoint.pt`` when it exists (written every ``cfg.checkpoint_every``
            epochs): trainable tensors, buffers, optimizer, scheduler, RNG and loader-generator states, step and
            history are restored, and training goes on from the next epoch. The run must be built as the killed
            one was: the same model and the same config, ``epochs`` included (the schedule was planned for
            them), else a :class:`~vpeft.train.checkpoint.ResumeMismatchError` names what differs. Without a
            checkpoint it starts from scratch.
        identity: What makes the run this run beyond ``cfg`` (e.g. backbone, weights fingerprint, data digest,
            method options: :func:`vpeft.run.finetune` passes it), stored in every checkpoint; resuming under
            another identity is refused, naming each differing field with both values.
        run: The run's identity (e.g. ``{run_id, method, task, backbone}``), written as ``"run"`` into
            ``metrics.json`` from the first epoch on, so every file of a run folder names the run it belongs to.
        val_loader: Optional loader evaluated after every epoch.
        device: Where the model and batches go.
        out_dir: Folder for ``metrics.json`` (created if missing).
        progress: Show a tqdm progress bar per epoch.
        callbacks: Called with each epoch record; a callback returning ``True`` stops training after that epoch.
        find_unused_parameters: Under DDP, let DDP tolerate trainable parameters that get no gradient in a step
            (needed for models that use a different subset of parameters per step; slower). Ignored otherwise.

    Returns:
        The per-epoch history, final metrics, total time and number of optimizer steps.

    Raises:
        ConfigError: No trainable parameters, or a loader without ``len()``; under DDP also a loader that cannot
            be sharded or a batch size not divisible by the world size.
        DataError: An empty training or validation loader.
        FloatingPointError: The training loss became NaN/inf.
    """
    with dist_utils.session(device) as ctx:  # None in a single-process run
        set_seed(cfg.seed)
        loop, train_loader, val_loader = _build_loop(
            model, cfg, train_loader, val_loader, device, ctx, resolve_task(model, task), find_unused_parameters
        )
        files = _RunFiles(
            Path(out_dir) if out_dir is not None else None,
            dict(run or {}),
            dict(identity) if identity is not None else None,
        )
        return _run_epochs(loop, train_loader, val_loader, files, resume=resume, progress=progress,
                           callbacks=callbacks)  # fmt: skip


@dataclass(frozen=True)
class _RunFiles:
    """What one :func:`train` call writes (``metrics.json``, ``checkpoint.pt``) and the identity they record."""

    out_dir: Path | None
    run: dict[str, Any]
    identity: dict[str, Any] | None

    @property
    def checkpoint(self) -> Path | None:
        return self.out_dir / ckpt.CHECKPOINT_NAME if self.out_dir is not None else None


def _build_loop(
    model: nn.Module,
    cfg: TrainConfig,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    device: str | torch.device,
    ctx: DistContext | None,
    task: Task,
    find_unused_parameters: bool,
) -> tuple[_Loop, Iterable[Any], Iterable[Any] | None]:
    """Move ``model`` to its device, build optimizer and schedule; under DDP wrap it and shard the loaders."""
    device = torch.device(device) if ctx is None else ctx.device
    model.to(device)
    channels_last = _apply_options(model, cfg)
    steps_per_epoch = math.ceil(_num_batches(train_loader) / cfg.grad_accum)
    if ctx is None or ctx.is_main:
        _warn_batch_size(train_loader, cfg)
    optimizer = build_optimizer(model, cfg)
    optimizer.zero_grad(set_to_none=True)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    if ctx is None:
        loop = _Loop(torch.compile(model) if cfg.compile else model, cfg, device, optimizer, scheduler, task=task)
    else:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ConfigError("under torchrun pass the plain model to train(); it wraps it in DDP itself")
        train_loader = dist_utils.shard_loader(train_loader, ctx, train=True, seed=cfg.seed)
        if val_loader is not None:
            val_loader = dist_utils.shard_loader(val_loader, ctx, train=False)
        ddp = dist_utils.wrap_ddp(model, ctx, find_unused_parameters)
        ddp = torch.compile(ddp) if cfg.compile else ddp
        loop = _Loop(ddp, cfg, device, optimizer, scheduler, task=task, dist=ctx, module=model)
    loop.channels_last = channels_last
    return loop, train_loader, val_loader


def _run_epochs(
    loop: _Loop,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    files: _RunFiles,
    *,
    resume: bool,
    progress: bool,
    callbacks: Sequence[Callback] | None,
) -> TrainResult:
    """The epochs from the first one not yet run (after a checkpoint with ``resume``) to ``cfg.epochs``."""
    cfg, ctx = loop.cfg, loop.dist
    write = files.out_dir is not None and loop.main
    result, start = TrainResult(), time.perf_counter()
    generator = getattr(train_loader, "generator", None)
    ckpt_path = files.checkpoint
    first = 1
    if resume and ckpt_path is not None and ckpt_path.is_file():
        first, elapsed = _restore(loop, ckpt_path, result, generator, files.identity)
        start -= elapsed
        result.resumed_after = first - 1
    elif resume:
        where = f" in {files.out_dir}" if files.out_dir else ""
        logger.info("no checkpoint to resume from%s: training from scratch", where)
    if ckpt_path is not None and loop.main:
        ckpt.clean_stale(ckpt_path.parent)
    steps_before = loop.step
    for epoch in range(first, cfg.epochs + 1):
        record = _epoch_record(loop, train_loader, val_loader, epoch, progress and loop.main)
        result.history.append(record)
        result.epochs_run.append(epoch)
        result.total_time_s, result.steps, result.final = time.perf_counter() - start, loop.step, record
        result.steps_run = loop.step - steps_before
        if write:
            _write_metrics(files.out_dir, cfg, result, epoch == cfg.epochs, files.run)  # type: ignore[arg-type]
            every = cfg.checkpoint_every
            if every and (epoch % every == 0 or epoch == cfg.epochs):
                _checkpoint(loop, ckpt_path, epoch, result, generator, files.identity)  # type: ignore[arg-type]
        stop = any([cb(record) is True for cb in callbacks or ()])  # a list: every callback sees every epoch
        if ctx is not None:  # one rank's callback stopping alone would leave the others waiting
            stop = dist_utils.all_reduce_sum([float(stop)], ctx)[0] > 0
        if stop:
            if loop.main:
                logger.info("a callback stopped training after epoch %d", epoch)
            result.stopped_early = True
            if write:
                _write_metrics(files.out_dir, cfg, result, True, files.run)  # type: ignore[arg-type]
            break
    return result


def _trained_module(loop: _Loop) -> nn.Module:
    return loop.module if loop.module is not None else loop.model


def _checkpoint(
    loop: _Loop, path: Path, epoch: int, result: TrainResult, generator, identity: dict[str, Any] | None
) -> None:
    payload = {
        "config": loop.cfg.to_dict(),
        "identity": identity,
        "resumes": result.resumes,
        "epoch": epoch,
        "step": loop.step,
        "last_lr": loop.last_lr,
        "elapsed_s": result.total_time_s,
        "history": result.history,
        "model": ckpt.model_tensors(_trained_module(loop)),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "rng": ckpt.capture_rng(generator),
    }
    ckpt.write_checkpoint(path, payload)


def _restore(
    loop: _Loop, path: Path, result: TrainResult, generator, identity: dict[str, Any] | None
) -> tuple[int, float]:
    """Load ``path`` into the loop; return ``(first epoch to run, elapsed seconds before)``."""
    payload = ckpt.read_checkpoint(path, loop.cfg.to_dict(), identity)
    module = _trained_module(loop)
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    own.update(dict(module.named_buffers()))
    saved = payload["model"]
    if set(saved) != set(own) or any(saved[n].shape != own[n].shape for n in own):
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to another model (its trainable tensors and buffers differ); "
            "resume with the method, backbone and task the run was started with"
        )
    with torch.no_grad():
        for n, t in saved.items():
            own[n].copy_(t)
    loop.optimizer.load_state_dict(payload["optimizer"])
    loop.scheduler.load_state_dict(payload["scheduler"])
    loop.step, loop.last_lr = int(payload["step"]), float(payload["last_lr"])
    ckpt.restore_rng(payload["rng"], generator)
    result.history = list(payload["history"])
    result.steps = loop.step
    result.final = result.history[-1] if result.history else {}
    result.total_time_s = float(payload["elapsed_s"])
    result.resumes = [*payload.get("resumes", []), {"after_epoch": int(payload["epoch"]), "step": loop.step}]
    if loop.main:
        logger.info("resumed from %s after epoch %d (step %d)", path, payload["epoch"], loop.step)
    return int(payload["epoch"]) + 1, float(payload["elapsed_s"])


def _apply_options(model: nn.Module, cfg: TrainConfig) -> bool:
    """Apply ``cfg.channels_last`` / ``cfg.grad_checkpointing`` to ``model`` in place; returns channels-last."""
    channels_last = cfg.channels_last
    if channels_last is None:  # automatic: CNN backbones (the measured winner), not transformers
        try:
            channels_last = get_spec(model).kind == "cnn"
        except UnsupportedBackboneError:  # a model vpeft has no spec for: leave it as it is
            channels_last = False
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        if isinstance(model, TaskModel):  # the backbone's blocks are what is worth recomputing
            model = model.backbone
        try:
            family = get_family(model)
        except UnsupportedBackboneError:
            raise ConfigError(
                f"TrainConfig.grad_checkpointing=True needs a backbone of a known family "
                f"({', '.join(supported_families())}); {type(model).__name__} is none"
            ) from None
        family.set_grad_checkpointing(model, True)
    if cfg.memory != "default":
        _recompute(model, cfg.memory)
    return bool(channels_last)


def _recompute(model: nn.Module, memory: str = "recompute") -> list[str]:
    """``TrainConfig.memory="recompute"``: recompute every block of the backbone (a task model's backbone);
    ``"half"``: the first :data:`~vpeft.arch.recompute.HALF` of them."""
    if isinstance(model, TaskModel):
        model = model.backbone
    try:
        family = get_family(model)
    except UnsupportedBackboneError:
        raise ConfigError(
            f"TrainConfig.memory={memory!r} needs a backbone of a known family "
            f"({', '.join(supported_families())}); {type(model).__name__} is none"
        ) from None
    return family.recompute_blocks(model, every=1, fraction=HALF if memory == "half" else 1.0)


def _epoch_record(
    loop: _Loop, train_loader: Iterable[Any], val_loader: Iterable[Any] | None, epoch: int, progress: bool
) -> dict[str, Any]:
    start = time.perf_counter()
    stats = loop.run_epoch(train_loader, epoch, progress)
    if val_loader is None:
        val = {}
    elif loop.dist is None:
        val = evaluate(loop.model, val_loader, loop.device, loop.cfg.bf16, task=loop.task)
    else:  # the unwrapped model on this rank's (already sharded) part of the split; counts all-reduced
        val = _evaluate(loop.module, val_loader, loop.device, loop.cfg.bf16, False, loop.dist, loop.task)  # type: ignore[arg-type]
    key = loop.task.primary_metric
    record: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"]}
    skip = ("loss", "n", "lr", "train_time_s")
    record.update({f"train_{k}": v for k, v in stats.items() if k not in skip and _scalar(v)})
    record.update({"lr": stats["lr"], f"val_{key}": None, "val_loss": None})
    record.update({f"val_{k}": v for k, v in val.items() if k != "n"})
    record.update(
        epoch_time_s=time.perf_counter() - start,
        images_per_s=stats["n"] / max(stats["train_time_s"], 1e-9),
        steps=loop.step,
    )
    if not loop.main:
        return record
    logger.info(
        "epoch %d/%d: train loss %.4f %s %.4f | val loss %s %s %s | lr %.3e | %.1f img/s",
        epoch,
        loop.cfg.epochs,
        record["train_loss"],
        key,
        record[f"train_{key}"],
        _fmt(record["val_loss"]),
        key,
        _fmt(record[f"val_{key}"]),
        record["lr"],
        record["images_per_s"],
    )
    return record


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _detach(output: Any) -> Any:
    """The model output without its autograd graph (tensors detached; other outputs, e.g. ModelOutputs, as given)."""
    return output.detach() if isinstance(output, torch.Tensor) else output


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _warn_batch_size(loader: Iterable[Any], cfg: TrainConfig) -> None:
    batch_size = getattr(loader, "batch_size", None)
    if batch_size is not None and batch_size != cfg.batch_size:
        logger.warning(
            "train_loader.batch_size=%d differs from TrainConfig.batch_size=%d; the loader's is used",
            batch_size,
            cfg.batch_size,
        )


def _write_metrics(
    out_dir: Path, cfg: TrainConfig, result: TrainResult, complete: bool, run: dict[str, Any] | None = None
) -> None:
    payload = {
        **({"run": run} if run else {}),
        "config": cfg.to_dict(),
        "history": result.history,
        "steps": result.steps,
        "elapsed_s": result.total_time_s,
        "complete": complete,
        "resumes": result.resumes,
    }
    write_json_atomic(out_dir / "metrics.json", payload)


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    bf16: bool = False,
    progress: bool = False,
    *,
    distributed: bool = False,
    task: Task | None = None,
) -> dict[str, Any]:
    """The task's metrics of ``model`` over ``loader`` (classification: mean cross-entropy and top-1 accuracy).

    Runs under ``torch.inference_mode()`` with ``model.eval()``, and restores the model's previous
    training mode afterwards. The model must already be on ``device``.

    With ``distributed=True`` inside a process group of more than one process (e.g. under ``torchrun``, within
    :func:`vpeft.train.distributed.session`), every rank evaluates its slice of each batch of ``loader`` (a
    DataLoader) and the sums are all-reduced: every rank must call it, and every rank gets the full-split result.

    Args:
        model: The classifier.
        loader: Yields ``(images, int64 targets)``.
        device: Where batches are moved.
        bf16: Run the forward pass under bf16 autocast.
        progress: Show a tqdm progress bar (rank 0 only under DDP).
        distributed: Shard the evaluation over the ranks of the current process group (no-op without one).
        task: The task whose loss and meter are used (default: a TaskModel's own task, else classification).

    Returns:
        The meter's metrics, e.g. ``{"top1": fraction correct in [0, 1], "loss": mean cross-entropy (no label
        smoothing), "n": samples}`` for classification.

    Raises:
        DataError: The loader yielded no samples.
        ConfigError: ``distributed`` with a loader that cannot be sharded (see
            :func:`vpeft.train.distributed.shard_loader`).
    """
    ctx = dist_utils.current(device) if distributed else None
    if ctx is not None:
        loader = dist_utils.shard_loader(loader, ctx, train=False)
    task = resolve_task(model, task)
    return _evaluate(model, loader, device, bf16, progress and (ctx is None or ctx.is_main), ctx, task)


def _evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device,
    bf16: bool,
    progress: bool,
    ctx: DistContext | None,
    task: Task,
) -> dict[str, Any]:
    device = torch.device(device)
    was_training = model.training
    model.eval()
    meter = task.new_meter()
    try:
        with torch.inference_mode():
            for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    output = task.forward(model, images, targets)
                meter.update(task.loss(output, targets), output, targets)
    finally:
        model.train(was_training)
    stats = meter.compute() if ctx is None else _reduce_meter(meter, task, ctx)
    if stats["n"] == 0:
        raise DataError("evaluation loader yielded no samples")
    return stats


def _reduce_meter(meter: Meter, task: Task, ctx: DistContext) -> dict[str, Any]:
    """The meter's statistics summed over all ranks (every rank must call it)."""
    total = task.new_meter()
    total.load_sums(torch.tensor(dist_utils.all_reduce_sum(meter.sums().tolist(), ctx), dtype=torch.float64))
    payload = meter.payload()  # records that are not sums (detections): gathered from every rank
    if payload is not None:
        total.load_payloads(dist_utils.all_gather_objects(payload, ctx))
    return total.compute()
