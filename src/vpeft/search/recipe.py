"""The search recipe behind ``vpeft search``: supernet training, evolutionary search, export, retraining.

Protocol (NOAH's, with vpeft's VTAB-1k splits): the supernet is trained on ``train800`` with a uniformly sampled
subnet per batch; candidates are ranked by their supernet slice's top-1 on ``val200``; the best one under the
budget is exported as a normal method config (``noah`` or ``glora``) and retrained from the frozen backbone with
the normal trainer (:func:`vpeft.run.finetune`) on ``train800val200``, then evaluated once on ``test``.

Output folder: ``found_config.json`` (the exported config, loadable with ``vpeft.MethodConfig.from_dict``),
``search_history.json`` (every evaluated candidate), ``supernet/metrics.json``, ``retrain/`` (the finetune
run: ``delta.safetensors``, ``metrics.json``, ``result.json``) and ``search_result.json`` (the summary).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..arch import input_size
from ..data import build_dataloader
from ..errors import ConfigError
from ..run import RunRequest, build_backbone, finetune, open_task
from ..tasks import ClassificationTask
from ..train import TrainConfig, evaluate, train
from ..train.metrics import write_json_atomic
from .evolution import EvolutionConfig, evolve, record
from .spaces import build_space
from .supernet import Supernet

__all__ = ["run_search"]

log = logging.getLogger(__name__)


def _train_cfg(epochs: int, lr: float, batch_size: int, weight_decay: float, seed: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_epochs=min(1.0, epochs / 10),
        seed=seed,
    )


def run_search(
    *,
    backbone: str,
    task: str,
    budget: int,
    out_dir: str | os.PathLike,
    space: str = "noah",
    data_root: str | os.PathLike | None = None,
    supernet_epochs: int = 1,
    retrain_epochs: int = 1,
    evolution: EvolutionConfig | None = None,
    img_size: int | None = None,
    lr: float = 1e-3,
    retrain_lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    sizes: Sequence[int] = (1, 5, 10),
    rank: int = 4,
    search_splits: tuple[str, str] = ("train800", "val200"),
    retrain_splits: tuple[str, str] = ("train800val200", "test"),
    retrain: bool = True,
    pretrained: bool = True,
    device: str = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Search a ``space`` ("noah" or "glora") subnet of ``backbone`` for ``task`` within ``budget`` parameters.

    Args:
        budget: the largest trainable-parameter count of the subnet, head excluded (NOAH's and GLoRA's limit).
        supernet_epochs / retrain_epochs: epochs of the two trainings (the papers: 500 / 100).
        evolution: population, generations, ... (the official values by default).
        sizes: NOAH's per-block sizes of LoRA rank, adapter width and prompts.
        rank: GLoRA's rank of its lora forms.
        retrain: retrain and test the found config (otherwise stop after exporting it).

    Returns:
        The summary written to ``search_result.json``.
    """
    evo = evolution or EvolutionConfig()
    out = Path(out_dir)
    folder = open_task(data_root, task)
    t = ClassificationTask.from_folder(folder.path)
    model = build_backbone(backbone, t.backbone_classes(), img_size, pretrained)
    search_space = _space_within_budget(model, space, budget, sizes=sizes, rank=rank)
    size = input_size(model, img_size)[-1]
    loaders = _search_loaders(t, folder.path, model, size, search_splits, batch_size, num_workers, seed)
    supernet_cfg = _train_cfg(supernet_epochs, lr, batch_size, weight_decay, seed)
    result, timings = _supernet_search(model, search_space, loaders, supernet_cfg, evo, budget, out_dir=out,
                                       device=device, progress=progress, seed=seed)  # fmt: skip
    config = _write_search_files(out, search_space, budget, evo, result)
    best = result.best
    summary: dict[str, Any] = {
        "backbone": backbone,
        "task": task,
        "img_size": size,
        "space": search_space.describe(),
        "budget": budget,
        "found_params": best.params,
        "found_val_top1": best.top1,
        "found_config": config.to_dict(),
        "evaluated": len(result.history),
        "max_params_evaluated": max(r.params for r in result.history),
        "supernet_epochs": supernet_epochs,
        **timings,
        "evolution": evo.to_dict(),
    }
    if retrain:
        request = RunRequest(
            backbone=backbone,
            method=config,
            task=task,
            data_root=folder.root,
            train_cfg=_train_cfg(retrain_epochs, retrain_lr or lr, batch_size, weight_decay, seed),
            img_size=img_size,
            train_split=retrain_splits[0],
            eval_split=retrain_splits[1],
            out_dir=out / "retrain",
            pretrained=pretrained,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )
        summary.update(_retrain(request, best.params))
    write_json_atomic(out / "search_result.json", summary)
    return summary


def _space_within_budget(model, space: str, budget: int, *, sizes: Sequence[int], rank: int):
    """The ``space`` of ``model``; refused when even its smallest candidate is over ``budget``."""
    kwargs: dict[str, Any] = {"sizes": tuple(sizes)} if space == "noah" else {"r": rank}
    search_space = build_space(space, model, **kwargs)
    if search_space.min_params() > budget:
        raise ConfigError(
            f"budget {budget:,} is below the smallest {space} candidate ({search_space.min_params():,} parameters)"
        )
    return search_space


def _search_loaders(task, root, model, size: int, splits: tuple[str, str], batch_size: int, num_workers: int,
                    seed: int):  # fmt: skip
    """The supernet's training loader and the candidates' ranking loader (``splits`` = train, val)."""
    train_ds, val_ds = (task.dataset(root, split, model, input_size=size) for split in splits)
    loader = build_dataloader(train_ds, batch_size, shuffle=True, num_workers=num_workers, seed=seed)
    val_loader = build_dataloader(val_ds, 2 * batch_size, shuffle=False, num_workers=num_workers)
    return loader, val_loader


def _write_search_files(out: Path, search_space, budget: int, evo: EvolutionConfig, result):
    """Write ``found_config.json`` and ``search_history.json``; return the exported config."""
    config = search_space.to_config(result.best.cand)
    write_json_atomic(out / "found_config.json", config.to_dict())
    write_json_atomic(
        out / "search_history.json",
        {
            "space": search_space.describe(),
            "budget": budget,
            "evolution": evo.to_dict(),
            "best": record(result.best, search_space),
            "history": [record(r, search_space) for r in result.history],
        },
    )
    return config


def _retrain(request: RunRequest, searched_params: int) -> dict[str, Any]:
    """Retrain the exported config from the frozen backbone and test it once; the summary's retrain fields."""
    rec = finetune(request)
    if rec.method_params != searched_params:  # the budget check must have used the exact count
        raise RuntimeError(f"exported config: {rec.method_params} parameters; the search counted {searched_params}")
    return {
        "retrain_epochs": request.train_cfg.epochs,
        "retrain_split": request.train_split,
        "eval_split": request.eval_split,
        "retrain_params": rec.method_params,
        "trainable_with_head": rec.trainable_params,
        "top1": rec.score,
        "retrain_time_s": rec.train_time_s,
    }


def _supernet_search(model, search_space, loaders, cfg: TrainConfig, evo: EvolutionConfig, budget: int, *,
                     out_dir: Path, device: str, progress: bool, seed: int):  # fmt: skip
    """Train the supernet (one sampled subnet per batch), then evolve candidates ranked on the val loader.

    Returns the evolution result and the summary's supernet fields (trainable count, the two phases' times).
    """
    loader, val_loader = loaders
    supernet = Supernet(model, search_space, seed=seed)
    log.info("supernet: %d trainable parameters; %d train / %d val images", supernet.trainable(),
             len(loader.dataset), len(val_loader.dataset))  # fmt: skip
    start = time.perf_counter()
    train(model, loader, cfg, device=device, out_dir=out_dir / "supernet", progress=progress)
    supernet_time = time.perf_counter() - start

    def score(cand):
        supernet.activate(cand)
        return evaluate(model, val_loader, device)

    start = time.perf_counter()
    result = evolve(search_space, score, budget, evo, progress=progress)
    search_time = time.perf_counter() - start
    supernet.close()
    timings = {"supernet_trainable": supernet.trainable(), "supernet_time_s": supernet_time,
               "search_time_s": search_time}  # fmt: skip
    return result, timings
