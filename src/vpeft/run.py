"""Recipes that tie backbone, method, data and training together (used by the CLI and the demo).

:func:`finetune` is the one end-to-end path: build the backbone for the task, apply the method,
train on one split, evaluate once on another, save the delta and a JSON result record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import backbones
from .api import apply, load, merge, save, save_merged
from .arch import input_size
from .config import MethodConfig
from .data import (
    GENERATED_TASKS,
    build_dataloader,
    default_data_root,
)
from .delta import check_train_extra, read_header
from .errors import CheckpointError, ConfigError, DataError
from .files import writing
from .state import state_of
from .tasks import Task, task_for_folder, task_from_dict
from .train import TrainConfig, evaluate, set_seed, train
from .train.cache import cached_training_setup, frozen_split
from .train.checkpoint import CHECKPOINT_NAME
from .train.distributed import main_first, session
from .train.metrics import write_json_atomic
from .version import __version__

__all__ = [
    "finetune",
    "check_resumable",
    "resume_identity",
    "task_kind_for",
    "RunResult",
    "TaskFolder",
    "evaluate_delta",
    "evaluate_zero_shot",
    "check_method_fits_task",
    "merge_delta",
    "export_peft_delta",
    "import_peft_delta",
    "open_task",
    "build_backbone",
    "model_from_delta",
    "RunRequest",
    "demo",
    "results_table",
    "DEMO_RECIPES",
]

log = logging.getLogger(__name__)


# ---- data -------------------------------------------------------------------------------------------------
def cache_data_root() -> Path:
    """``$VPEFT_CACHE/data`` or ``~/.cache/vpeft/data``: where generated tasks (digits) are written."""
    return Path(os.environ.get("VPEFT_CACHE") or Path.home() / ".cache" / "vpeft") / "data"


@dataclasses.dataclass(frozen=True)
class TaskFolder:
    """A located task folder; what it holds (and so the task type) is read by :func:`vpeft.tasks.task_for_folder`."""

    root: Path
    name: str

    @property
    def path(self) -> Path:
        return self.root / self.name

    def task(self, kind: str | None = None, **options: Any) -> Task:
        """The folder's task (its type detected from the files unless ``kind`` is given)."""
        return task_for_folder(self.path, kind, **options)


def open_task(data_root: str | os.PathLike | None, task: str) -> TaskFolder:
    """Locate ``task`` under ``data_root`` (default :func:`vpeft.data.default_data_root`).

    A generated task (:data:`vpeft.data.GENERATED_TASKS`: ``digits``, scikit-learn's bundled 8x8 digits in VTAB-1k
    format; ``moving_digits``, those digits moving on a canvas as a video task) is exported on first use.
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    if not isinstance(task, str) or not task or task in (".", "..") or Path(task).name != task or "\\" in task:
        raise DataError(
            f"task name {task!r} must be one folder name under the data root {root} (no paths, no '..'); "
            "pass --data-root to read tasks elsewhere"
        )
    path = root / task
    if task in GENERATED_TASKS and not path.exists():
        if data_root is None:  # never write into a shared default root: export into the user's cache
            root = cache_data_root()
            path = root / task
        GENERATED_TASKS[task](root)
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DataError(f"task {task!r} not found under data root {root}; tasks there: {present or 'none'}")
    return TaskFolder(root, task)


# ---- backbone ---------------------------------------------------------------------------------------------
def build_backbone(
    name: str, num_classes: int, img_size: int | None = None, pretrained: bool = True, **kwargs: Any
) -> nn.Module:
    """A backbone with a fresh ``num_classes`` head (local converted weights or timm's hub path).

    ``pretrained=False`` draws the random weights from a fixed seed, so a delta trained on such a smoke-test
    backbone can be loaded again onto an identical one. ``kwargs`` (e.g. ``dynamic_img_size``) go to the model;
    an architecture that takes any input size (a CNN) is built without the size arguments
    (:func:`vpeft.backbones.takes_input_size`).
    """
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = backbones.create(name, num_classes=num_classes, pretrained=pretrained, img_size=img_size, **kwargs)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "vpeft_backbone": name}
    return model


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The outcome of :func:`finetune`, typed; :meth:`to_dict` is the JSON record written to ``result.json``.

    ``metrics`` holds the task's evaluation metrics on ``eval_split`` (classification: ``top1``, ``loss``, ``n``;
    segmentation: ``miou``, ``per_class_iou``, ``pixel_acc`` ...); ``score`` is its primary metric.
    ``train_time_s`` includes building the feature cache; ``feature_cache`` names the cached prefix
    (``"pre_logits"`` or a number of blocks), ``None`` when training ran uncached.
    """

    backbone: str
    img_size: int
    method: str
    config: dict[str, Any]
    task: str
    task_spec: dict[str, Any]
    primary_metric: str
    num_classes: int | None
    train_split: str
    eval_split: str
    train: dict[str, Any]
    trainable_params: int
    method_params: int
    decoder_params: int
    total_params: int
    metrics: dict[str, Any]
    train_time_s: float
    train_images_per_s: float
    eval_time_s: float
    final_train: dict[str, Any]
    feature_cache: str | None = None
    delta_bytes: int | None = None
    vpeft_version: str = __version__

    @property
    def score(self) -> float:
        """The primary metric on ``eval_split`` (a fraction in [0, 1])."""
        return float(self.metrics[self.primary_metric])

    @property
    def eval_n(self) -> int:
        return int(self.metrics["n"])

    @property
    def top1(self) -> float | None:
        """Top-1 accuracy of a classification run (``None`` for other tasks)."""
        return self.metrics.get("top1")

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON record (earlier records' keys kept: ``top1``, ``eval_loss``, ``eval_n`` ...)."""
        d = dataclasses.asdict(self)
        d.pop("final_train")
        d.update(
            {k: v for k, v in self.metrics.items() if k not in ("loss", "n")},
            eval_loss=self.metrics.get("loss"),
            eval_n=self.eval_n,
            score=self.score,
            final_train_top1=self.final_train.get("train_top1"),
            **{f"final_{k}": v for k, v in self.final_train.items() if k.startswith("train_") and k != "train_top1"},
        )
        if self.delta_bytes is None:
            d.pop("delta_bytes")
        return d


# ---- the one end-to-end path ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunRequest:
    """One run, fully described: what :func:`finetune` trains and evaluates (the parameter list exists here once).

    The CLI (``vpeft train``), the bench protocol, ``vpeft tune`` and the structure search's retraining build one and
    derive the runs they need from it with :meth:`replace` (other splits, recipe, output folder).

    Attributes:
        backbone: backbone name (a local one, a timm name, ``open_clip:<model>``, ``hf:<id>``).
        method: the method config (a ``MethodConfig``, its dict, or a method name).
        task: task folder name under ``data_root``.
        data_root: folder holding the task folders (default: :func:`vpeft.data.default_data_root`).
        train_cfg: the training recipe (default ``TrainConfig()``).
        img_size: input side (default: the backbone's).
        train_split / eval_split: trained on, evaluated once at the end.
        val_split: evaluated after every epoch (``val_<metric>`` in the epoch records), or ``None``.
        out_dir: where the run's files go (``None``: nothing is written).
        pretrained: the backbone's weights (``False``: seeded random weights, for smoke tests).
        device, num_workers, progress: where and how it runs.
        task_kind / task_options: force and configure the task type (e.g. ``{"decoder": "fpn"}``).
        resume: continue the run in ``out_dir`` from its checkpoint.
        run_id: the run's id (generated unless given; kept when resuming).
    """

    backbone: str
    method: Any
    task: str
    data_root: str | os.PathLike | None = None
    train_cfg: TrainConfig | None = None
    img_size: int | None = None
    train_split: str = "train800val200"
    eval_split: str = "test"
    val_split: str | None = None
    out_dir: str | os.PathLike | None = None
    pretrained: bool = True
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True
    task_kind: str | None = None
    task_options: Mapping[str, Any] | None = None
    resume: bool = False
    run_id: str | None = None

    def replace(self, **changes: Any) -> RunRequest:
        """A copy with ``changes`` (unknown field names are a TypeError naming the valid ones)."""
        return dataclasses.replace(self, **_check_fields(changes))


def _check_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    valid = [f.name for f in dataclasses.fields(RunRequest)]
    unknown = [k for k in fields if k not in valid]
    if unknown:
        raise TypeError(f"unknown run field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
    return dict(fields)


def finetune(
    request: RunRequest | None = None, /, *, callbacks: Sequence[Any] | None = None, **fields: Any
) -> RunResult:
    """Adapt ``backbone`` to ``task`` with ``method``; return (and write) the run's result.

    Called with a :class:`RunRequest` (``finetune(request)``), with its fields as keywords
    (``finetune(backbone=..., method=..., task=...)``), or both (the keywords replace the request's fields).

    The task folder's format decides the task type (:func:`vpeft.tasks.task_for_folder`; a CLIP backbone
    (``open_clip:<model>``, ``hf:<id>``) makes a classification folder a zero-shot task; ``task_kind`` forces
    one, ``task_options`` configures it, e.g. ``{"decoder": "fpn"}`` for segmentation), which builds the model
    around the backbone, its loss and its metrics. The protocol: hyper-parameters are chosen with a train split
    and a validation split (VTAB-1k: ``train800`` / ``val200``); the final run trains on both
    (``train800val200``) and evaluates ``test`` once. With ``out_dir``: ``delta.safetensors``, ``metrics.json``
    (per epoch) and ``result.json``; while training, ``checkpoint.pt`` (every ``train_cfg.checkpoint_every``
    epochs), from which ``resume=True`` continues a killed run to the same result; it is removed once
    ``result.json`` is written. Every file of the run folder names the run (``"run"``: ``run_id`` -- generated
    unless given, kept when resuming --, method, task, backbone).

    ``val_split`` is evaluated after every epoch (``val_<metric>`` in each epoch record of ``metrics.json``);
    ``callbacks`` see each epoch record, and one returning ``True`` stops training after that epoch
    (:func:`vpeft.train.train`): ``vpeft tune`` prunes bad trials this way from their per-epoch val metric.

    Under ``torchrun`` every process runs this function: training is data-parallel with ``train_cfg.batch_size``
    as the global batch, the final evaluation is sharded over the processes, and only rank 0 logs and writes
    files; the others wait for it at a barrier, then return the same result (without ``delta_bytes``).
    """
    if request is None:
        req = RunRequest(**_check_fields(fields))
    else:
        req = request.replace(**fields) if fields else request
    check_resumable(req.out_dir, req.resume)
    with session(req.device) as ctx:  # None in a single-process run
        cfg = req.train_cfg or TrainConfig()
        main = ctx is None or ctx.is_main
        device = ctx.device if ctx is not None else req.device
        run = _prepare(req, cfg, ctx)
        if main:
            log.info("%s on %s/%s (%s; %d train, %d eval, %d px)", run.report, req.task, req.train_split,
                     run.task.describe(), len(run.train_ds), len(run.eval_ds), run.size)  # fmt: skip
        start = time.perf_counter()
        trained, loader, val_loader, cached = _maybe_cache(
            run.model, run.loader, run.val_loader, cfg, device, ctx is None, req.progress and main
        )
        cache_time = time.perf_counter() - start
        out = Path(req.out_dir) if req.out_dir is not None else None
        identity = _run_identity(out, req.method, req.task, req.backbone, req.run_id, req.resume)
        splits = {"train": req.train_split, "eval": req.eval_split, "val": req.val_split}
        same_run = resume_identity(run.model, run.folder, run.task, req.backbone, req.pretrained, run.size, splits,
                                   req.task_options)  # fmt: skip
        result = train(trained, loader, cfg, val_loader=val_loader, device=device, out_dir=out,
                       progress=req.progress, callbacks=callbacks, task=run.task, resume=req.resume, run=identity,
                       identity=same_run)  # fmt: skip
        train_time = cache_time + result.total_time_s  # a resumed run counts the epochs before the crash too
        delta_bytes = _save_delta(run, req, out) if out is not None and main else None  # before test is read
        start = time.perf_counter()
        eval_loader = build_dataloader(run.eval_ds, 2 * cfg.batch_size, shuffle=False, num_workers=req.num_workers)
        ev = evaluate(run.model, eval_loader, device, distributed=True, task=run.task)  # sharded over the processes
        res = _run_result(req, run, cfg, result.final, dict(ev), train_time, cached, time.perf_counter() - start,
                          delta_bytes)  # fmt: skip
        if out is not None and main:
            write_json_atomic(out / "result.json", {"run": identity, **res.to_dict()})
            (out / CHECKPOINT_NAME).unlink(missing_ok=True)  # the run is complete: its delta and result are written
        return res


@dataclasses.dataclass
class _Prepared:
    """A run's task, adapted model and data, built from its :class:`RunRequest`."""

    folder: TaskFolder
    task: Task
    model: nn.Module
    report: Any
    size: int
    train_ds: Any
    eval_ds: Any
    loader: Any
    val_loader: Any


def _prepare(req: RunRequest, cfg: TrainConfig, ctx) -> _Prepared:
    """Folder -> task -> backbone -> task model -> method applied -> datasets and loaders."""
    with main_first(ctx):  # rank 0 alone exports generated data and converts weights into the caches
        folder = open_task(req.data_root, req.task)
        t = folder.task(task_kind_for(req.backbone, req.task_kind), **dict(req.task_options or {}))
        set_seed(cfg.seed)  # the new head and the method's parameters are drawn from the run's seed
        check_method_fits_task(req.method, t)
        backbone = build_backbone(req.backbone, t.backbone_classes(), req.img_size, req.pretrained,
                                  **t.backbone_kwargs())  # fmt: skip
        model = t.build(backbone)
        rep = apply(model, req.method)
    size = input_size(model, req.img_size)[-1]  # a task model's backbone decides
    train_ds = t.dataset(folder.path, req.train_split, model, input_size=size, train=True)
    eval_ds = t.dataset(folder.path, req.eval_split, model, input_size=size)
    loader = build_dataloader(train_ds, cfg.batch_size, shuffle=True, num_workers=req.num_workers, seed=cfg.seed)
    val_loader = None
    if req.val_split is not None:
        val_ds = t.dataset(folder.path, req.val_split, model, input_size=size)
        val_loader = build_dataloader(val_ds, 2 * cfg.batch_size, shuffle=False, num_workers=req.num_workers)
    return _Prepared(folder, t, model, rep, size, train_ds, eval_ds, loader, val_loader)


def _save_delta(run: _Prepared, req: RunRequest, out: Path) -> int:
    """Write the trained delta with what ``vpeft eval`` needs to rebuild the model; its size in bytes."""
    spec = run.task.to_dict()
    extra = {"task": req.task, "num_classes": spec.get("num_classes"), "img_size": run.size,
             "backbone_arg": req.backbone, "pretrained": req.pretrained, "task_spec": spec}  # fmt: skip
    with writing(out / "delta.safetensors"):  # disk full, read-only ...: one line naming the file
        save(run.model, out / "delta.safetensors", extra=extra)
    return (out / "delta.safetensors").stat().st_size


def _run_result(req: RunRequest, run: _Prepared, cfg: TrainConfig, final: Mapping[str, Any], metrics: dict[str, Any],
                train_time: float, cached: Any, eval_time: float, delta_bytes: int | None) -> RunResult:  # fmt: skip
    spec, rep = run.task.to_dict(), run.report
    return RunResult(
        backbone=req.backbone,
        img_size=run.size,
        method=rep.method,
        config=_config_dict(run.model),
        task=req.task,
        task_spec=spec,
        primary_metric=run.task.primary_metric,
        num_classes=spec.get("num_classes"),
        train_split=req.train_split,
        eval_split=req.eval_split,
        train=cfg.to_dict(),
        trainable_params=rep.trainable,
        method_params=rep.method_params,
        decoder_params=rep.decoder,
        total_params=rep.total,
        metrics=metrics,
        train_time_s=train_time,
        train_images_per_s=len(run.train_ds) * cfg.epochs / max(train_time, 1e-9),
        feature_cache=cached,
        eval_time_s=eval_time,
        final_train={k: v for k, v in final.items() if k.startswith("train_")},
        delta_bytes=delta_bytes,
    )


def check_resumable(out_dir: str | os.PathLike | None, resume: bool) -> None:
    """Refuse ``resume`` on a finished run folder (``result.json`` written, its checkpoint removed): resuming it
    would train again from scratch and replace the finished run."""
    if not resume or out_dir is None:
        return
    out = Path(out_dir)
    if (out / "result.json").is_file() and not (out / CHECKPOINT_NAME).is_file():
        raise ConfigError(
            f"--out {str(out)!r} holds a finished run (result.json, no {CHECKPOINT_NAME}): there is nothing to "
            "resume; pass --overwrite instead of --resume to train it again"
        )


def list_files_digest(folder: Path, splits: Sequence[str | None]) -> str:
    """SHA-256 over the names and bytes of the task folder's list files that training reads: ``classes.txt`` and
    every top-level ``X.txt`` whose name ``X`` is part of one of ``splits`` (``train800val200``: its own list,
    ``train800.txt`` and ``val200.txt``; ``trainval``: ``train.txt``, ``val.txt``). Other lists (``test.txt``) are
    never opened: the protocol reads the test split once, after training."""
    import hashlib

    names = [s for s in splits if s]
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.txt")):
        if path.stem == "classes" or any(path.stem in name for name in names):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def resume_identity(
    model: nn.Module,
    folder: TaskFolder,
    task: Task,
    backbone: str,
    pretrained: bool,
    img_size: int,
    splits: Mapping[str, str | None],
    task_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What makes a run this run besides its training config: stored in its checkpoints, checked on resume."""
    state = state_of(model)
    return {
        "backbone": backbone,
        "pretrained": pretrained,
        "weights_fingerprint": state.fingerprint,
        "task_folder": str(folder.path.resolve()),
        "task_lists_sha256": list_files_digest(folder.path, [splits.get("train"), splits.get("val")]),
        "task": task.to_dict(),
        "task_options": dict(task_options or {}),
        "splits": dict(splits),
        "img_size": img_size,
        "method": state.config.to_dict(),
    }


def task_kind_for(backbone: str, task_kind: str | None = None) -> str | None:
    """The task type a run of ``backbone`` uses: ``task_kind`` when given; a CLIP backbone (``open_clip:...``,
    ``hf:...``) classifies by its class names (``"zeroshot"``); otherwise ``None`` (detected from the folder)."""
    return backbones.default_task_kind(backbone) if task_kind is None else task_kind


def _run_identity(
    out: Path | None, method: Any, task: str, backbone: str, run_id: str | None, resume: bool
) -> dict[str, Any]:
    """``{run_id, method, task, backbone, started_utc}``; a resumed run keeps the identity its folder recorded."""
    import datetime
    import uuid

    if resume and out is not None and (out / "metrics.json").is_file():
        try:
            recorded = json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("run")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, dict) and recorded.get("run_id"):
            return recorded
    name = method if isinstance(method, str) else getattr(method, "method", None) or dict(method).get("method")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return {
        "run_id": run_id or f"{name}-{task}-{stamp}-{uuid.uuid4().hex[:8]}",
        "method": name,
        "task": task,
        "backbone": backbone,
        "started_utc": stamp,
    }


def _maybe_cache(
    model: nn.Module, loader, val_loader, cfg: TrainConfig, device: str, single_process: bool, progress: bool
) -> tuple[nn.Module, Any, Any, str | None]:
    """``(model to train, its loader, its val loader, cached depth)``: the cached suffix where caching is exact,
    else as given.

    Exact means: ``cfg.feature_cache``, a single process, no gradient checkpointing (it belongs to the whole
    model), a training set without random augmentation, and a frozen deterministic prefix
    (:func:`vpeft.train.cache.frozen_split`).
    """
    uncached = model, loader, val_loader, None
    if not (cfg.feature_cache and single_process and not cfg.grad_checkpointing):
        return uncached
    if getattr(loader.dataset, "random_augmentation", False):
        return uncached
    try:
        split = frozen_split(model)
    except ConfigError:  # not a timm model with forward_features / forward_head
        return uncached
    if split is None:
        return uncached
    set_seed(cfg.seed)  # as train() will: the cached loader then shuffles exactly as the original
    setup = cached_training_setup(model, loader, val_loader, device=device, progress=progress)
    log.info("training on cached features of the frozen prefix (%s, %.1f MiB)", setup.depth, setup.nbytes / 2**20)
    return setup.model, setup.train_loader, setup.val_loader, str(setup.depth)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    return state_of(model).config.to_dict()


def model_from_delta(
    delta: str | os.PathLike, *, trust_unsigned: bool = False
) -> tuple[nn.Module, dict[str, Any], Task]:
    """Rebuild the model a delta was trained with (backbone, and the task's model around it) and load the delta."""
    header, _ = read_header(delta, trust_unsigned=trust_unsigned)
    extra = dict(header.extra)
    check_train_extra(extra, str(delta))
    spec = extra.get("task_spec") or {"kind": "classification", "num_classes": extra["num_classes"]}
    try:
        task = task_from_dict(spec)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"delta {str(delta)!r}: metadata task_spec {spec!r:.80} is invalid ({exc})") from None
    pretrained = extra.get("pretrained", True)
    backbone = build_backbone(
        extra["backbone_arg"], task.backbone_classes(), extra.get("img_size"), pretrained, **task.backbone_kwargs()
    )
    model = task.build(backbone)
    load(model, delta, trust_unsigned=trust_unsigned)
    return model, extra, task


def evaluate_delta(
    delta: str | os.PathLike,
    *,
    task: str | None = None,
    data_root: str | os.PathLike | None = None,
    split: str = "test",
    batch_size: int = 128,
    device: str = "cpu",
    merged: bool = False,
    save_predictions: str | os.PathLike | None = None,
    max_predictions: int | None = None,
    trust_unsigned: bool = False,
) -> dict[str, Any]:
    """Rebuild the model a delta was trained with, load it, and evaluate the task's metrics on ``split``.

    With ``save_predictions`` (a folder) the predictions are also written as pictures (segmentation: one colour
    overlay PNG per image, at most ``max_predictions``).
    """
    model, extra, t = model_from_delta(delta, trust_unsigned=trust_unsigned)
    if task is None and "task" not in extra:
        raise CheckpointError(f"delta {str(delta)!r} does not name its task; pass --task")
    folder = open_task(data_root, task or extra["task"])
    _check_task_fits(t, folder, delta, extra)
    if merged:
        merge(model)
    ds = t.dataset(folder.path, split, model, input_size=extra.get("img_size"))
    model.to(device)
    metrics = t.named_metrics(evaluate(model, build_dataloader(ds, batch_size, shuffle=False), device, task=t), ds)
    out = {"task": folder.name, "split": split, "primary_metric": t.primary_metric, **metrics}
    if save_predictions is not None:
        written = t.save_predictions(model, ds, Path(save_predictions), device=device, limit=max_predictions)
        out["predictions"] = {"folder": str(save_predictions), "files": len(written)}
    return out


def _check_task_fits(t: Task, folder: TaskFolder, delta: str | os.PathLike, extra: Mapping[str, Any]) -> None:
    """Refuse evaluating a delta on a folder of another task kind or class count."""
    detected = folder.task()
    trained = extra.get("task", "unknown")
    if detected.kind != t.kind and detected.kind not in t.folder_kinds:
        raise DataError(
            f"delta {str(delta)!r} was trained for a {t.kind} task but task folder {folder.name!r} holds a "
            f"{detected.kind} task; evaluate it on a {t.kind} task (it was trained on {trained!r})"
        )
    here = folder.task(t.kind, **t.folder_options())
    mine, theirs = t.to_dict().get("num_classes"), here.to_dict().get("num_classes")
    if mine is not None and theirs is not None and mine != theirs:
        raise DataError(
            f"delta {str(delta)!r} has a {mine}-class head but task {folder.name!r} has {theirs} classes; "
            f"evaluate it on the task it was trained on ({trained!r})"
        )


def check_method_fits_task(method: MethodConfig | Mapping[str, Any] | str, task: Task) -> None:
    """Refuse, before anything is built, a linear probe of a task whose model has no head to train: a zero-shot
    CLIP task classifies by class names, and its ``probe`` option adds the trainable linear head."""
    if isinstance(method, str):
        name = method
    elif isinstance(method, Mapping):
        name = method.get("method")
    else:
        name = getattr(method, "method", None)
    if name == "linear" and task.kind == "zeroshot" and not getattr(task, "probe", False):
        raise ConfigError(
            "method 'linear' trains a classification head, and a zero-shot CLIP task has none (it classifies by "
            "class names); add the linear-probe head with the task option probe=true (CLI: --task-opt probe=true), "
            "train a prompt (coop, cocoop, maple) or a tower method instead, or evaluate the CLIP as it is with "
            "vpeft zeroshot"
        )


def evaluate_zero_shot(
    backbone: str,
    *,
    task: str,
    data_root: str | os.PathLike | None = None,
    split: str = "test",
    img_size: int | None = None,
    pretrained: bool = True,
    task_options: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Evaluate a CLIP backbone zero-shot (nothing trained) on ``split`` of a classification task folder.

    The class names come from the folder's ``classes.txt``, the prompts from CoOp's template for the task (CLIP's
    80 templates with ``task_options={"ensemble": True}``); ``task_options`` are the zero-shot task's (``classes``,
    ``templates``, ``context_length`` ...). Returns ``{backbone, task, split, primary_metric, <metrics>,
    task_spec}``.

    Raises:
        ConfigError: ``backbone`` is not a CLIP (``open_clip:<model>``, ``hf:<id>``), or a bad task option.
    """
    if backbones.default_task_kind(backbone) != "zeroshot":
        raise ConfigError(
            f"backbone {backbone!r} is not a CLIP; zero-shot evaluation needs a text tower: use 'open_clip:<model>' "
            "or 'hf:<hub id>'"
        )
    folder = open_task(data_root, task)
    options = dict(task_options or {})
    if options.get("probe") or options.get("shots"):
        raise ConfigError(
            "zero-shot evaluation trains nothing: the task options probe and shots belong to training runs "
            "(vpeft train --task-opt ...)"
        )
    t = folder.task("zeroshot", **options)
    model = t.build(build_backbone(backbone, t.backbone_classes(), img_size, pretrained, **t.backbone_kwargs()))
    model.requires_grad_(False)
    model.to(device)
    size = input_size(model, img_size)[-1]
    ds = t.dataset(folder.path, split, model, input_size=size)
    loader = build_dataloader(ds, batch_size, shuffle=False, num_workers=num_workers)
    metrics = evaluate(model, loader, device, task=t)
    spec = t.to_dict()
    return {
        "backbone": backbone,
        "pretrained": pretrained,
        "task": folder.name,
        "split": split,
        "img_size": size,
        "primary_metric": t.primary_metric,
        **metrics,
        "task_spec": spec,
    }


def merge_delta(delta: str | os.PathLike, out: str | os.PathLike, *, trust_unsigned: bool = False) -> Path:
    """Write the full merged model (a plain timm state dict) of a mergeable delta."""
    model, _, _ = model_from_delta(delta, trust_unsigned=trust_unsigned)
    merge(model, keep_original=False)
    with writing(out):
        return save_merged(model, out)


def export_peft_delta(delta: str | os.PathLike, out: str | os.PathLike, *, pad_fused: bool = False) -> Path:
    """Write a LoRA / DoRA classification delta as a Hugging Face PEFT adapter folder
    (:func:`vpeft.interop.peft.export_peft`), keeping the delta's run information for :func:`import_peft_delta`."""
    from .interop.peft import export_peft

    model, extra, task = model_from_delta(delta)
    if task.kind != "classification":
        raise ConfigError(
            f"delta {str(delta)!r} is for a {task.kind} task; PEFT export covers classification deltas (a backbone "
            "and its head)"
        )
    return export_peft(model, out, pad_fused=pad_fused, extra=extra)


def import_peft_delta(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    *,
    backbone: str | None = None,
    img_size: int | None = None,
    num_classes: int | None = None,
    pretrained: bool | None = None,
) -> Path:
    """Turn a Hugging Face PEFT LoRA / DoRA adapter folder into a vpeft delta file that ``vpeft eval`` and
    ``vpeft merge`` read (:func:`vpeft.interop.peft.import_peft` onto a freshly built backbone).

    An adapter written by :func:`export_peft_delta` names its backbone, image size, classes and task; for any
    other the backbone must be given, and the classes are read from its saved head (``modules_to_save``) unless
    ``num_classes`` is given. Arguments given override what the adapter says.
    """
    from .interop.peft import PREFIX, import_peft, read_peft

    config, tensors, meta = read_peft(directory)
    try:
        extra = json.loads(meta.get("vpeft_extra") or "{}")
    except ValueError:
        raise CheckpointError(f"PEFT adapter {str(directory)!r}: metadata vpeft_extra is not JSON") from None
    if not isinstance(extra, dict):
        raise CheckpointError(f"PEFT adapter {str(directory)!r}: metadata vpeft_extra is not a JSON object")
    if extra:
        check_train_extra(extra, str(directory))
    name = backbone or extra.get("backbone_arg") or meta.get("vpeft_backbone")
    if not name:
        raise ConfigError(f"PEFT adapter {str(directory)!r} does not name its backbone; pass --backbone")
    saved = [f"{PREFIX}{m}.weight" for m in config.get("modules_to_save") or []]
    heads = [tensors[k] for k in saved if k in tensors]
    classes = num_classes or extra.get("num_classes") or (int(heads[0].shape[0]) if heads else None)
    if not classes:
        raise ConfigError(f"PEFT adapter {str(directory)!r} holds no classification head; pass --num-classes")
    size = img_size if img_size is not None else extra.get("img_size")
    pretrained = extra.get("pretrained", True) if pretrained is None else pretrained
    model = build_backbone(name, classes, size, pretrained)
    import_peft(model, directory)
    spec = task_from_dict({"kind": "classification", "num_classes": classes}).to_dict()
    info = {
        **{k: v for k, v in extra.items() if k == "task"},
        "num_classes": classes,
        "img_size": input_size(model, size)[-1],
        "backbone_arg": name,
        "pretrained": pretrained,
        "task_spec": spec,
    }
    return save(model, out, extra=info)


# ---- the README's main job ------------------------------------------------------------------------------------
# Experiments as data: per-method training recipes of the demo (AdamW, cosine, 1 warm-up epoch).
DEMO_RECIPES: dict[str, dict[str, Any]] = {
    "linear": {"lr": 1e-2},
    "lora": {"lr": 1e-3},
    "vpt_deep": {"lr": 1e-2},
    "vpt_shallow": {"lr": 1e-2},
    "adapter": {"lr": 1e-3},
    "adaptformer": {"lr": 1e-3},
    "bitfit": {"lr": 1e-3},
    "ln_tune": {"lr": 1e-3},
    "ssf": {"lr": 1e-3},
    "partial": {"lr": 1e-4},
    "full": {"lr": 5e-5},
}
DEMO_BACKBONE = "dinov2_vits14_imgfocus"


def demo(
    methods: Sequence[str] = ("linear", "lora", "vpt_deep"),
    *,
    epochs: int = 3,
    img_size: int = 112,
    task: str = "digits",
    data_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "runs/demo",
    batch_size: int = 32,
    progress: bool = True,
) -> list[RunResult]:
    """Adapt the real DINOv2 ViT-S/14 with several methods on a real dataset, offline; one result per method.

    Default data: scikit-learn's digits (real handwritten digits, shipped with scikit-learn), exported in
    VTAB-1k format under ``~/.cache/vpeft/data`` (or ``$VPEFT_CACHE/data``).
    """
    data_root = cache_data_root() if data_root is None else data_root
    records = []
    for name in methods:
        recipe = {"epochs": epochs, "batch_size": batch_size, "warmup_epochs": 1.0, **DEMO_RECIPES.get(name, {})}
        rec = finetune(
            backbone=DEMO_BACKBONE,
            method=name,
            task=task,
            data_root=data_root,
            train_cfg=TrainConfig(**recipe),
            img_size=img_size,
            out_dir=Path(out_dir) / name,
            progress=progress,
        )
        records.append(rec)
        log.info("%s: %s %.4f", name, rec.primary_metric, rec.score)
    write_json_atomic(Path(out_dir) / "results.json", [r.to_dict() for r in records])
    return records


_METRIC_NAMES = {"top1": "top-1", "miou": "mIoU"}


def results_table(records: Sequence[RunResult | Mapping[str, Any]], chance: float | None = None) -> str:
    """A Markdown table of results (method, trainable params, the primary metric, times)."""
    rows = [r.to_dict() if isinstance(r, RunResult) else dict(r) for r in records]
    key = rows[0].get("primary_metric", "top1") if rows else "top1"
    name = _METRIC_NAMES.get(key, key)
    lines = [
        f"| method | trainable params | % of model | {name} (%) | train time (s) | eval time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.3f} | "
            f"{100 * r[key]:.2f} | {r['train_time_s']:.1f} | {r['eval_time_s']:.1f} |"
        )
    if chance is not None:
        lines.append(f"\nchance level: {100 * chance:.1f}%")
    return "\n".join(lines)
