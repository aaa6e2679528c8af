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
from torch.utils.data import Dataset

from . import __version__
from .api import apply, load, merge, read_delta, save, save_merged
from .arch import input_size
from .config import MethodConfig
from .data import (
    ImageFolderDataset,
    VTABTask,
    build_dataloader,
    build_transform,
    default_data_root,
    ensure_digits_task,
)
from .errors import DataError
from .train import TrainConfig, evaluate, set_seed, train
from .train.distributed import main_first, session
from .train.metrics import write_json_atomic

__all__ = [
    "finetune",
    "evaluate_delta",
    "merge_delta",
    "open_task",
    "build_backbone",
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
class Task:
    """A task folder: VTAB-1k lists (``train800.txt`` ...) or one image folder per split (``train/``, ``test/``)."""

    root: Path
    name: str
    num_classes: int

    @property
    def path(self) -> Path:
        return self.root / self.name

    def dataset(self, split: str, transform) -> Dataset:
        if (self.path / f"{split}.txt").is_file():
            return VTABTask.from_dir(self.path).dataset(split, transform)
        if (self.path / split).is_dir():
            return ImageFolderDataset(self.path / split, transform)
        options = sorted(
            {p.stem for p in self.path.glob("*.txt")} | {p.name for p in self.path.iterdir() if p.is_dir()}
        )
        raise DataError(
            f"task {self.name!r} has no split {split!r} (no {split}.txt, no {split}/ folder); found: {options}"
        )


def open_task(data_root: str | os.PathLike | None, task: str) -> Task:
    """Locate ``task`` under ``data_root`` (default :func:`vpeft.data.default_data_root`).

    ``digits`` (scikit-learn's bundled 8x8 digits) is exported in VTAB-1k format on first use.
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    path = root / task
    if task == "digits" and not path.exists():
        if data_root is None:  # never write into a shared default root: export into the user's cache
            root = cache_data_root()
            path = root / task
        ensure_digits_task(root)
    if not path.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DataError(f"task {task!r} not found under data root {root}; tasks there: {present or 'none'}")
    if any((path / f"{s}.txt").is_file() for s in ("train800", "train800val200", "test", "val200")):
        n = VTABTask.from_dir(path).num_classes
    else:
        splits = [p for p in path.iterdir() if p.is_dir()]
        if not splits:
            raise DataError(f"task folder {path} holds neither VTAB-1k split lists nor split image folders")
        n = max(ImageFolderDataset(p).num_classes for p in splits)
    return Task(root, task, n)


# ---- backbone ---------------------------------------------------------------------------------------------
def build_backbone(name: str, num_classes: int, img_size: int | None = None, pretrained: bool = True) -> nn.Module:
    """A backbone with a fresh ``num_classes`` head (local converted weights or timm's hub path).

    ``pretrained=False`` draws the random weights from a fixed seed, so a delta trained on such a smoke-test
    backbone can be loaded again onto an identical one.
    """
    from . import backbones

    kwargs: dict[str, Any] = {"img_size": img_size} if img_size is not None else {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            model = backbones.create(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
        except TypeError as exc:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(exc):
                raise
            model = backbones.create(name, num_classes=num_classes, pretrained=pretrained)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "vpeft_backbone": name}
    return model


# ---- the one end-to-end path ------------------------------------------------------------------------------------
def finetune(
    *,
    backbone: str,
    method: MethodConfig | Mapping[str, Any] | str,
    task: str,
    data_root: str | os.PathLike | None = None,
    train_cfg: TrainConfig | None = None,
    img_size: int | None = None,
    train_split: str = "train800val200",
    eval_split: str = "test",
    out_dir: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Adapt ``backbone`` to ``task`` with ``method``; return (and write) a result record.

    The VTAB-1k protocol: hyper-parameters are chosen with ``train_split="train800"``,
    ``eval_split="val200"``; the final run trains on ``train800val200`` and evaluates ``test`` once.
    With ``out_dir``: ``delta.safetensors``, ``metrics.json`` (per epoch) and ``result.json``.

    Under ``torchrun`` every process runs this function: training is data-parallel with ``train_cfg.batch_size``
    as the global batch, the final evaluation is sharded over the processes, and only rank 0 logs and writes
    files; the others wait for it at a barrier, then return the same record (without ``delta_bytes``).
    """
    with session(device) as ctx:  # None in a single-process run
        cfg = train_cfg or TrainConfig()
        main = ctx is None or ctx.is_main
        device = ctx.device if ctx is not None else device
        with main_first(ctx):  # rank 0 alone exports generated data and converts weights into the caches
            t = open_task(data_root, task)
            set_seed(cfg.seed)  # the new head and the method's parameters are drawn from the run's seed
            model = build_backbone(backbone, t.num_classes, img_size, pretrained)
            rep = apply(model, method)
        size = input_size(model, img_size)[-1]
        tf = build_transform(model, input_size=size)
        train_ds, eval_ds = t.dataset(train_split, tf), t.dataset(eval_split, tf)
        loader = build_dataloader(train_ds, cfg.batch_size, shuffle=True, num_workers=num_workers, seed=cfg.seed)
        out = Path(out_dir) if out_dir is not None else None
        if main:
            n_train, n_eval = len(train_ds), len(eval_ds)
            log.info("%s on %s/%s (%d train, %d eval images, %d px)", rep, task, train_split, n_train, n_eval, size)
        result = train(model, loader, cfg, device=device, out_dir=out, progress=progress)
        start = time.perf_counter()
        eval_loader = build_dataloader(eval_ds, 2 * cfg.batch_size, shuffle=False, num_workers=num_workers)
        ev = evaluate(model, eval_loader, device, distributed=True)  # sharded over the processes under torchrun
        record = {
            "vpeft_version": __version__,
            "backbone": backbone,
            "img_size": size,
            "method": rep.method,
            "config": _config_dict(model),
            "task": task,
            "num_classes": t.num_classes,
            "train_split": train_split,
            "eval_split": eval_split,
            "train": cfg.to_dict(),
            "trainable_params": rep.trainable,
            "method_params": rep.method_params,
            "total_params": rep.total,
            "top1": ev["top1"],
            "eval_loss": ev["loss"],
            "eval_n": ev["n"],
            "train_time_s": result.total_time_s,
            "train_images_per_s": len(train_ds) * cfg.epochs / max(result.total_time_s, 1e-9),
            "eval_time_s": time.perf_counter() - start,
            "final_train_top1": result.final.get("train_top1"),
        }
        if out is not None and main:
            extra = {
                "task": task,
                "num_classes": t.num_classes,
                "img_size": size,
                "backbone_arg": backbone,
                "pretrained": pretrained,
            }
            save(model, out / "delta.safetensors", extra=extra)
            record["delta_bytes"] = (out / "delta.safetensors").stat().st_size
            write_json_atomic(out / "result.json", record)
        return record


def _config_dict(model: nn.Module) -> dict[str, Any]:
    return model.__dict__["_vpeft_state"].config.to_dict()


def _model_from_delta(delta: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    meta, _ = read_delta(delta)
    extra = json.loads(meta.get("extra") or "{}")
    missing = [k for k in ("num_classes", "backbone_arg") if k not in extra]
    if missing:
        raise DataError(f"delta {str(delta)!r} lacks {missing} in its metadata; it was not written by vpeft train")
    pretrained = extra.get("pretrained", True)
    model = build_backbone(extra["backbone_arg"], extra["num_classes"], extra.get("img_size"), pretrained)
    load(model, delta)
    return model, extra


def evaluate_delta(
    delta: str | os.PathLike,
    *,
    task: str | None = None,
    data_root: str | os.PathLike | None = None,
    split: str = "test",
    batch_size: int = 128,
    device: str = "cpu",
    merged: bool = False,
) -> dict[str, Any]:
    """Rebuild the backbone a delta was trained on, load it, and evaluate top-1 on ``split``."""
    model, extra = _model_from_delta(delta)
    if merged:
        merge(model)
    t = open_task(data_root, task or extra["task"])
    ds = t.dataset(split, build_transform(model, input_size=extra.get("img_size")))
    model.to(device)
    return {"task": t.name, "split": split, **evaluate(model, build_dataloader(ds, batch_size, shuffle=False), device)}


def merge_delta(delta: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the full merged model (a plain timm state dict) of a mergeable delta."""
    model, _ = _model_from_delta(delta)
    merge(model, keep_original=False)
    return save_merged(model, out)


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
) -> list[dict[str, Any]]:
    """Adapt the real DINOv2 ViT-S/14 with several methods on a real dataset, offline; one record per method.

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
        log.info("%s: top-1 %.4f", name, rec["top1"])
    write_json_atomic(Path(out_dir) / "results.json", records)
    return records


def results_table(records: Sequence[Mapping[str, Any]], chance: float | None = None) -> str:
    """A Markdown table of result records (method, trainable params, top-1, times)."""
    lines = [
        "| method | trainable params | % of model | top-1 (%) | train time (s) | eval time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.3f} | "
            f"{100 * r['top1']:.2f} | {r['train_time_s']:.1f} | {r['eval_time_s']:.1f} |"
        )
    if chance is not None:
        lines.append(f"\nchance level: {100 * chance:.1f}%")
    return "\n".join(lines)
