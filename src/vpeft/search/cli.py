"""The ``vpeft search`` subcommand (registered by :mod:`vpeft.cli`): flags -> :func:`vpeft.search.run_search`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import Range, declare_option_check, ranged_option
from ..errors import ConfigError
from ..files import destination_option

__all__ = ["add_search_command"]


def _ints(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v)
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated integers, got {value!r}") from None
    for size in sizes:
        Range.int(1).check("--sizes: size", size)
    return sizes


def _cmd_search(args: argparse.Namespace) -> int:
    from .evolution import EvolutionConfig
    from .recipe import run_search

    evo = EvolutionConfig(
        population=args.population,
        generations=args.generations,
        select=args.select,
        mutation=args.mutation,
        crossover=args.crossover,
        m_prob=args.m_prob,
        s_prob=args.s_prob,
        seed=args.seed,
    )
    summary = run_search(
        backbone=args.backbone,
        task=args.task,
        data_root=args.data_root,
        space=args.space,
        budget=args.budget,
        out_dir=args.out,
        supernet_epochs=args.supernet_epochs,
        retrain_epochs=args.retrain_epochs,
        evolution=evo,
        img_size=args.img_size,
        lr=args.lr,
        retrain_lr=args.retrain_lr,
        batch_size=args.batch_size,
        sizes=_ints(args.sizes),
        rank=args.rank,
        retrain=not args.no_retrain,
        pretrained=not args.no_pretrained,
        device=args.device,
        seed=args.seed,
        num_workers=args.workers,
        progress=not args.quiet,
    )
    keys = ("budget", "found_params", "found_val_top1", "top1", "supernet_time_s", "search_time_s", "retrain_time_s")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    print(f"found config: {args.out}/found_config.json; history: {args.out}/search_history.json")
    return 0


def add_search_command(sub: Any) -> None:  # argparse subparsers (their class is private)
    """Add ``search`` to the ``vpeft`` sub-commands."""
    p = sub.add_parser(
        "search",
        help="NOAH / GLoRA structure search: supernet, evolutionary search under a parameter budget, retrain",
    )
    p.add_argument("--backbone", required=True, help="local backbone (vpeft backbones) or any timm ViT name")
    p.add_argument("--task", required=True, help="task folder name (VTAB-1k lists), e.g. cifar10; or 'digits'")
    p.add_argument("--data-root", default=None, help="folder of task folders (default: as vpeft train)")
    p.add_argument("--space", choices=("noah", "glora"), default="noah", help="search space")
    ranged_option(
        p, "--budget", range=Range.int(1), required=True, help="max trainable parameters of the subnet, head excluded"
    )
    ranged_option(p, "--supernet-epochs", range=Range.int(1), default=1, help="supernet training epochs on train800")
    ranged_option(p, "--retrain-epochs", range=Range.int(1), default=1, help="epochs of the found config's retraining")
    _add_evolution_flags(p)
    _add_training_flags(p)
    p.add_argument("--no-retrain", action="store_true", help="stop after exporting the found config")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation (for smoke tests)")
    destination_option(p, "--out", folder=True, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_search)


def _add_evolution_flags(p: Any) -> None:
    """The evolutionary search's flags and the spaces' sizes."""
    ranged_option(p, "--population", range=Range.int(1), default=50, help="candidates per generation of the evolution")
    ranged_option(p, "--generations", range=Range.int(0), default=20, help="generations of the evolutionary search")
    ranged_option(p, "--select", range=Range.int(1), default=10, help="parents kept per generation")
    ranged_option(
        p,
        "--mutation",
        range=Range.int(0),
        default=None,
        help="mutated children per generation (default: population/2)",
    )
    ranged_option(
        p,
        "--crossover",
        range=Range.int(0),
        default=None,
        help="crossed-over children per generation (default: population/2)",
    )
    ranged_option(
        p, "--m-prob", range=Range.float(0, 1), default=0.2, help="mutation probability per module / block / tensor"
    )
    ranged_option(
        p, "--s-prob", range=Range.float(0, 1), default=0.4, help="NOAH: probability of a depth change in a mutation"
    )
    declare_option_check(
        p,
        p.add_argument("--sizes", default="1,5,10", help="NOAH: per-block sizes of LoRA rank, adapter width, prompts"),
        lambda flag, value: _ints(value),
    )
    ranged_option(p, "--rank", range=Range.int(1), default=4, help="GLoRA: rank of the lora forms")


def _add_training_flags(p: Any) -> None:
    """The supernet training's and the retraining's flags."""
    ranged_option(p, "--img-size", range=Range.int(1), default=None, help="input side (default: the backbone's)")
    ranged_option(
        p,
        "--lr",
        range=Range.float(0, 1e30, low_open=True),
        default=1e-3,
        help="supernet learning rate (and retrain, unless given)",
    )
    ranged_option(
        p,
        "--retrain-lr",
        range=Range.float(0, 1e30, low_open=True),
        default=None,
        help="retraining learning rate (default: --lr)",
    )
    ranged_option(
        p, "--batch-size", range=Range.int(1), default=64, help="batch size of supernet training and retraining"
    )
    ranged_option(p, "--seed", range=Range.int(0, 2**32 - 1), default=0, help="seed of training and of the evolution")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    ranged_option(p, "--workers", range=Range.int(0), default=0, help="data-loading worker processes")
