"""The ``vpeft search`` subcommand (registered by :mod:`vpeft.cli`): flags -> :func:`vpeft.search.run_search`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError

__all__ = ["add_search_command"]


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v)
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated integers, got {value!r}") from None


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
    p.add_argument("--budget", type=int, required=True, help="max trainable parameters of the subnet, head excluded")
    p.add_argument("--supernet-epochs", type=int, default=1, help="supernet training epochs on train800")
    p.add_argument("--retrain-epochs", type=int, default=1, help="epochs of the found config's retraining")
    p.add_argument("--population", type=int, default=50, help="candidates per generation of the evolution")
    p.add_argument("--generations", type=int, default=20, help="generations of the evolutionary search")
    p.add_argument("--select", type=int, default=10, help="parents kept per generation")
    p.add_argument("--mutation", type=int, default=None, help="mutated children per generation (default: population/2)")
    p.add_argument(
        "--crossover", type=int, default=None, help="crossed-over children per generation (default: population/2)"
    )
    p.add_argument("--m-prob", type=float, default=0.2, help="mutation probability per module / block / tensor")
    p.add_argument("--s-prob", type=float, default=0.4, help="NOAH: probability of a depth change in a mutation")
    p.add_argument("--sizes", default="1,5,10", help="NOAH: per-block sizes of LoRA rank, adapter width, prompts")
    p.add_argument("--rank", type=int, default=4, help="GLoRA: rank of the lora forms")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the backbone's)")
    p.add_argument("--lr", type=float, default=1e-3, help="supernet learning rate (and retrain, unless given)")
    p.add_argument("--retrain-lr", type=float, default=None, help="retraining learning rate (default: --lr)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of supernet training and retraining")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of the evolution")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--no-retrain", action="store_true", help="stop after exporting the found config")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation (for smoke tests)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_search)
