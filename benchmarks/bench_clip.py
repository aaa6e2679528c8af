"""Training-step cost of the CLIP prompt learners vs a zero-shot forward pass, measured in one run.

One random-init CLIP (default open_clip ViT-B/16 at 224 px; nothing is downloaded), a batch of ``--batch`` images,
``--classes`` class names:

* ``zero-shot forward``: inference with the text features cached (the unit of every "x zero-shot" ratio) -- what
  zero-shot CLIP costs per batch once the class weights exist;
* ``zero-shot, text uncached``: the same forward recomputing the class weights (C prompts through the text tower);
* ``limit``: everything frozen, text features cached, the input images require grad, cross-entropy backward to
  the images -- the activation-gradient limit of the image tower, the unit of every "x limit" ratio (methods that
  train inside the text tower also pay its forward and backward over the C prompts);
* training steps (forward + cross-entropy + backward + AdamW step + zero_grad) of CoOp (M = 16), CoCoOp (M = 4 +
  meta-net: B x C prompts through the text tower per step), MaPLe (J = 9), CLIP-LoRA (r = 2, q/k/v of both
  towers) and CLIP-Adapter.

Timing: one warm-up round, then ``--repeats`` interleaved rounds, medians; process CPU time with one thread on CPU,
else wall time (``_common.py``).

Measured (``--size 96 --batch 4 --classes 5 --repeats 2``, random ViT-B/16, one CPU thread on a loaded 2-core
machine, process CPU time): zero-shot forward 296 ms (1.00x); class weights recomputed 2.08x; CoOp step 3.22x;
CoCoOp step 9.30x (2.89x CoOp: B x C prompts through the text tower); MaPLe 4.47x; CLIP-LoRA 4.39x; CLIP-Adapter
0.94x (no backward through the towers).

Usage::

    python benchmarks/bench_clip.py                 # ViT-B/16, batch 8, 10 classes (minutes on one core)
    python benchmarks/bench_clip.py --quick         # tiny CLIP, seconds
    python benchmarks/bench_clip.py --device cuda --batch 32 --classes 100 --threads 0
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from typing import Any

import _common as C
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vpeft  # noqa: E402
from vpeft.backbones.clip import create, tiny_open_clip  # noqa: E402
from vpeft.tasks.zeroshot import ZeroShotTask  # noqa: E402
from vpeft.train import TrainConfig, build_optimizer  # noqa: E402

METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("coop", "coop", {}),
    ("cocoop", "cocoop", {}),
    ("maple", "maple", {}),
    ("clip_lora", "clip_lora", {"dropout": 0.0}),
    ("clip_adapter", "clip_adapter", {}),
]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="open_clip:ViT-B-16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny CLIP, 2 repeats")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    if args.quick:
        return tiny_open_clip(), 32
    return create(args.model, img_size=args.size), args.size


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    threads = C.set_threads(args.threads)
    device = torch.device(args.device)
    repeats = 2 if args.quick else args.repeats
    base, size = build(args)
    base.eval().to(device)
    names = tuple(f"class {i}" for i in range(args.classes))
    task = ZeroShotTask(names)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)

    zs = task.build(base)
    with torch.no_grad():
        zs(x)  # fills the text-feature cache

    def zero_shot() -> None:
        with torch.no_grad():
            zs(x)

    def uncached() -> None:
        zs.__dict__["_cache"] = None
        zero_shot()

    frozen = task.build(copy.deepcopy(base).requires_grad_(False).to(device))
    with torch.no_grad():
        frozen(x)  # its own text-feature cache

    def limit() -> None:
        frozen.task.loss(frozen(x.detach().requires_grad_(True)), y).backward()

    fns = {"zero-shot forward": zero_shot, "zero-shot, text uncached": uncached, "limit": limit}
    params = {}
    for label, method, kwargs in METHODS:
        if method == "maple":
            kwargs = {"depth": min(9, len(base.image_blocks()), len(base.text_blocks()))}
        clip = copy.deepcopy(base)
        rep = vpeft.apply(clip, method, **kwargs)
        params[label] = rep.method_params
        model = task.build(clip.to(device))
        opt = build_optimizer(model, TrainConfig(epochs=1, lr=1e-3))

        def step(model=model, opt=opt) -> None:
            model.train()
            loss = model.task.loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[f"{label} step"] = step
    clock = C.pick_clock(device, threads)
    for fn in fns.values():  # warm-up
        fn()
    times = C.time_interleaved(fns, repeats, device, clock=clock)
    unit, lim = C.median(times["zero-shot forward"]), C.median(times["limit"])
    rows = []
    for name, ts in times.items():
        label = name.removesuffix(" step")
        row = {"name": name, "config": label, "ms": 1e3 * C.median(ts), "ratio": C.median(ts) / unit}
        rows.append({**row, "x_limit": C.median(ts) / lim, "params": params.get(label)})
    extra = f", {'tiny CLIP' if args.quick else args.model} at {size} px, batch {args.batch}, {args.classes} classes"
    print(C.header("CLIP prompt learners: training step vs zero-shot forward", device, threads, extra, clock))
    print()
    print(
        C.table(
            rows,
            [
                ("name", "config", "s"),
                ("params", "trainable", ","),
                ("ms", "ms", ".1f"),
                ("ratio", "x zero-shot forward", ".2f"),
                ("x_limit", "x limit", ".2f"),
            ],
        )
    )
    coop, cocoop = times["coop step"], times["cocoop step"]
    print(
        f"\nCoCoOp step / CoOp step: {C.median(cocoop) / C.median(coop):.2f}x "
        f"(CoCoOp runs {args.batch} x {args.classes} prompts through the text tower, CoOp {args.classes})"
    )
    C.write_json(args.json, {"rows": rows, "args": vars(args), "clock": clock, "threads": threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
