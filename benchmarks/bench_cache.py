"""Feature caching: cost of an epoch after the first, with and without the cache, and identical results.

For linear probing (and partial-k, the last ``--partial-k`` blocks trained) of a random-init timm model
(default ViT-S/16, 224 px) on a synthetic data set without augmentation (the VTAB-1k protocol), the same
training (``vpeft.train.train``, same config, same seeded loaders) runs twice in one process:

* uncached: every epoch runs the whole backbone;
* cached: :func:`vpeft.train.cache.cached_training_setup` runs the frozen prefix once over the training and
  validation data (its time is charged to the first epoch), then every epoch trains the suffix only.

Reported: the median wall time (the training loop's ``epoch_time_s``) of the epochs after the first
(training + validation), the speed-up (target for
linear probe: >= 10x), the first epoch including the caching pass, the cache size, and whether the two runs
give the same results (largest difference of any trained tensor and of the per-epoch losses).

Usage::

    python benchmarks/bench_cache.py              # ViT-S/16, 128 train + 32 val images, 3 epochs (a few minutes)
    python benchmarks/bench_cache.py --quick      # tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import _common as C
import torch
from torch.utils.data import TensorDataset

import vpeft
from vpeft.data import build_dataloader
from vpeft.train import TrainConfig, train
from vpeft.train.cache import cached_training_setup


def _dataset(n: int, size: int, classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def run(args, method: str, kwargs: dict[str, Any], cached: bool) -> dict[str, Any]:
    model = C.create_model(args.model, args.size, num_classes=args.classes, quick=args.quick)
    vpeft.apply(model, method, **kwargs)
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    train_loader = build_dataloader(_dataset(args.train, size, args.classes, 0), args.batch, shuffle=True, seed=0)
    val_loader = build_dataloader(_dataset(args.val, size, args.classes, 1), args.batch, shuffle=False)
    cfg = TrainConfig(epochs=args.epochs, lr=1e-3, batch_size=args.batch, warmup_epochs=1.0, log_every=0)
    out: dict[str, Any] = {"cache_s": 0.0}
    target = model
    if cached:
        start = time.perf_counter()
        setup = cached_training_setup(model, train_loader, val_loader)
        out.update(cache_s=time.perf_counter() - start, depth=setup.depth, cache_mib=setup.nbytes / 2**20)
        out["on_disk"] = setup.on_disk
        target, train_loader, val_loader = setup.model, setup.train_loader, setup.val_loader
    result = train(target, train_loader, cfg, val_loader=val_loader, progress=False)
    out["epoch_s"] = [r["epoch_time_s"] for r in result.history]
    out["losses"] = [(r["train_loss"], r["val_loss"]) for r in result.history]
    out["trained"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out


def compare(args, name: str, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    print(f"{name}: uncached run", file=sys.stderr, flush=True)
    ref = run(args, method, kwargs, cached=False)
    print(f"{name}: cached run", file=sys.stderr, flush=True)
    got = run(args, method, kwargs, cached=True)
    later_ref, later_got = C.median(ref["epoch_s"][1:]), C.median(got["epoch_s"][1:])
    diff = max((got["trained"][n] - t).abs().max().item() for n, t in ref["trained"].items())
    loss_diff = max(abs(a - b) for ra, rb in zip(ref["losses"], got["losses"]) for a, b in zip(ra, rb))
    return {
        "config": name,
        "depth": got["depth"],
        "cache_mib": got["cache_mib"],
        "on_disk": got["on_disk"],
        "first_uncached_s": ref["epoch_s"][0],
        "first_cached_s": got["cache_s"] + got["epoch_s"][0],
        "later_uncached_s": later_ref,
        "later_cached_s": later_got,
        "speedup": later_ref / later_got,
        "max_param_diff": diff,
        "max_loss_diff": loss_diff,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--train", type=int, default=128, help="training images")
    p.add_argument("--val", type=int, default=32, help="validation images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--partial-k", type=int, default=1, help="also run partial-k with this k (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny ViT, 32 + 8 images, 2 epochs (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.val, args.batch, args.epochs = 32, 8, 8, 2
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the speed-up is measured on the epochs after the first)")
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    threads = C.set_threads(args.threads)
    rows = [compare(args, "linear probe", "linear", {})]
    if args.partial_k:
        rows.append(compare(args, f"partial-{args.partial_k}", "partial", {"k": args.partial_k}))
    desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    print(
        C.header(
            f"Feature caching: {desc}, {args.train} train + {args.val} val images, {size} px, batch {args.batch}, "
            f"{args.epochs} epochs",
            torch.device("cpu"),
            threads,
        )
    )
    print()
    print(
        C.table(
            rows,
            [
                ("config", "config", "s"),
                ("depth", "cached prefix", ""),
                ("cache_mib", "cache MiB", ".1f"),
                ("on_disk", "on disk", ""),
                ("first_uncached_s", "epoch 1 s (no cache)", ".2f"),
                ("first_cached_s", "epoch 1 s (cache, incl. caching)", ".2f"),
                ("later_uncached_s", "later epoch s (no cache)", ".3f"),
                ("later_cached_s", "later epoch s (cache)", ".4f"),
                ("speedup", "speed-up", ".1f"),
                ("max_param_diff", "max |d trained tensor|", ".1e"),
                ("max_loss_diff", "max |d loss|", ".1e"),
            ],
        )
    )
    lp = rows[0]
    ok = lp["speedup"] >= 10 and lp["max_param_diff"] <= 1e-5
    print(
        f"\nlinear probe: an epoch after the first is {lp['speedup']:.1f}x cheaper with the cache "
        f"(target >= 10x), results {'identical' if lp['max_param_diff'] == 0 else 'equal within float rounding'} "
        f"-> {'met' if ok else 'NOT met'}"
    )
    C.write_json(args.json, {"args": vars(args), "threads": threads, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
