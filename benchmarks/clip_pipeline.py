"""The vision-language protocols end to end: few-shot, base-to-novel (HM) and cross-dataset transfer on VTAB folders.

**With random weights (the default here: no CLIP weights exist offline) every accuracy below measures only the
plumbing** -- data lists, K-shot sampling, the base/novel split, the task slot, prompt training, evaluation and the
HM arithmetic -- not CLIP or the methods; expect chance-level numbers. With a network, ``--pretrained openai`` loads
real weights through open_clip and the same script is the real protocol.

For every task folder (``classes.txt`` + VTAB lists) under ``--data-root``:

1. base-to-novel (CoCoOp's protocol): classes sorted by label, the first ceil(n/2) are base; a K-shot training set
   is drawn from the base classes of ``train800val200`` (seeded; the list is written to ``<out>/lists``), each method
   trains on it, and is tested on the base and on the novel classes of ``test`` (each with its own class names);
   HM = 2BN / (B + N). ``zeroshot`` is CLIP with the task's hand-written template, no training.
2. cross-dataset: each method trained K-shot on all classes of the first task is evaluated zero-shot on the others.

Results: ``<out>/results.json`` and a markdown table on stdout.

Usage::

    python benchmarks/clip_pipeline.py --data-root ../shared/data/vtab1k --tasks cifar10,dtd10 --shots 4 --size 64
    python benchmarks/clip_pipeline.py --quick      # tiny CLIP, 1 epoch, 64 test images per split: seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vpeft  # noqa: E402
from vpeft.backbones.clip import create, tiny_open_clip  # noqa: E402
from vpeft.data import build_dataloader, build_transform  # noqa: E402
from vpeft.data.fewshot import SampleList, base_novel_split, few_shot_split, harmonic_mean, restrict  # noqa: E402
from vpeft.data.vtab import read_split_list  # noqa: E402
from vpeft.tasks.zeroshot import ZeroShotTask  # noqa: E402
from vpeft.train import TrainConfig, evaluate, train  # noqa: E402

log = logging.getLogger("clip_pipeline")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default="../shared/data/vtab1k")
    p.add_argument("--tasks", default="cifar10,dtd10")
    p.add_argument("--model", default="open_clip:ViT-B-16")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs a network)")
    p.add_argument("--size", type=int, default=64, help="input size (ViT-B/16 at 64 px: 4 x 4 patches)")
    p.add_argument("--methods", default="zeroshot,coop,cocoop,maple")
    p.add_argument("--shots", default="4", help="comma-separated K values (CoOp: 1,2,4,8,16)")
    p.add_argument("--seeds", default="1")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-test", type=int, default=200, help="test images per split (0: all)")
    p.add_argument("--out", default="runs/clip_pipeline")
    p.add_argument("--quick", action="store_true")
    return p.parse_args(argv)


def backbone(args: argparse.Namespace):
    if args.quick:
        return tiny_open_clip()
    return create(args.model, pretrained=args.pretrained, img_size=args.size)


def method_kwargs(name: str, clip) -> dict[str, Any]:
    if name == "maple":
        return {"depth": min(9, len(clip.image_blocks()), len(clip.text_blocks()))}
    return {}


def loader(samples, model, args, train_split: bool):
    size = 32 if args.quick else args.size
    ds = SampleList(samples, build_transform(model, input_size=size))
    return build_dataloader(ds, args.batch_size, shuffle=train_split, seed=0)


def subsample(samples, n: int):
    if not n or len(samples) <= n:
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)]


def accuracy(model, samples, args) -> float:
    return float(evaluate(model, loader(samples, model, args, False))["top1"])


def fit(method: str, base_clip, task: ZeroShotTask, samples, args, seed: int):
    """A fresh copy of the backbone adapted with ``method`` and trained on ``samples`` (zeroshot: untouched)."""
    clip = copy.deepcopy(base_clip)
    model = task.build(clip)
    if method != "zeroshot":
        torch.manual_seed(seed)
        vpeft.apply(model, method, **method_kwargs(method, clip))
        epochs = 1 if args.quick else args.epochs
        train(
            model, loader(samples, model, args, True), TrainConfig(epochs=epochs, lr=args.lr, seed=seed), progress=False
        )
    return clip


def run(args: argparse.Namespace) -> dict[str, Any]:
    root, out = Path(args.data_root), Path(args.out)
    tasks = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    base_clip = backbone(args).eval()
    max_test = 64 if args.quick else args.max_test
    rows: list[dict[str, Any]] = []
    for shots in (int(k) for k in args.shots.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in tasks:
                full = ZeroShotTask.from_folder(root / name)
                base, novel = base_novel_split(len(full.class_names))
                drawn, _ = few_shot_split(root / name, shots, seed, out / "lists", classes=base, tag="base")
                test = read_split_list(root / name, "test")
                for method in methods:
                    t0 = time.perf_counter()
                    clip = fit(method, base_clip, full.subset(base), drawn, args, seed)
                    b = accuracy(full.subset(base).build(clip), subsample(restrict(test, base), max_test), args)
                    n = accuracy(full.subset(novel).build(clip), subsample(restrict(test, novel), max_test), args)
                    rows.append(
                        {
                            "protocol": "base-to-novel",
                            "task": name,
                            "method": method,
                            "shots": shots,
                            "seed": seed,
                            "base": b,
                            "novel": n,
                            "hm": harmonic_mean(b, n),
                            "time_s": time.perf_counter() - t0,
                        }
                    )
                    log.warning("%s", rows[-1])
            # cross-dataset: trained on all classes of the first task, zero-shot on the others
            source = ZeroShotTask.from_folder(root / tasks[0])
            drawn, _ = few_shot_split(root / tasks[0], shots, seed, out / "lists", tag="all")
            for method in methods:
                clip = fit(method, base_clip, source, drawn, args, seed)
                for name in tasks:
                    target = ZeroShotTask.from_folder(root / name)
                    test = subsample(read_split_list(root / name, "test"), max_test)
                    rows.append(
                        {
                            "protocol": "cross-dataset",
                            "source": tasks[0],
                            "task": name,
                            "method": method,
                            "shots": shots,
                            "seed": seed,
                            "top1": accuracy(target.build(clip), test, args),
                        }
                    )
    return {"rows": rows, "args": vars(args), "random_weights": args.pretrained is None}


def table(rows: list[dict[str, Any]]) -> str:
    b2n = [r for r in rows if r["protocol"] == "base-to-novel"]
    lines = ["| task | method | K | seed | base | novel | HM |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {r['task']} | {r['method']} | {r['shots']} | {r['seed']} | {100 * r['base']:.1f} | "
        f"{100 * r['novel']:.1f} | {100 * r['hm']:.1f} |"
        for r in b2n
    ]
    cross = [r for r in rows if r["protocol"] == "cross-dataset"]
    lines += ["", "| source -> target | method | K | top-1 |", "|---|---|---:|---:|"]
    lines += [f"| {r['source']} -> {r['task']} | {r['method']} | {r['shots']} | {100 * r['top1']:.1f} |" for r in cross]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["random_weights"]:
        print("RANDOM WEIGHTS: these accuracies measure only the plumbing, not CLIP or the methods.\n")
    print(table(result["rows"]))
    print(f"\nresults written to {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
