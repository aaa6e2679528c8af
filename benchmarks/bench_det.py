"""Cost of one object-detection training step per PEFT method vs the frozen-backbone detector step and the limit.

Measured in one process on one random-init timm model (default ViT-S/16, batch 4, 224 px canvas, fp32, 12
classes, torchvision FCOS on ViTDet's simple pyramid; ``--detector retinanet|faster_rcnn`` for the others):

* ``forward``: the backbone's inference forward (``forward_features`` under ``torch.no_grad``), the unit of
  every "x forward" ratio;
* ``limit``: backbone and detector frozen, the input requires grad, the detector's losses backpropagated to the
  input -- forward + activation gradients, no weight gradient: what any method that trains inside the backbone
  must pay; the unit of every "x limit" ratio;
* ``frozen``: backbone frozen, neck and heads trained (the linear-probe analogue, "head-only"): the unit of every
  "x frozen" ratio -- what adapting the backbone adds over training the detector alone;
* one row per method: ``bitfit``, ``lora``, ``adaptformer``, ``vpt_deep``, ``ssf`` (vpeft defaults) and
  ``full``.

A step is the detector's training forward (torchvision's loss dict, summed by :meth:`DetectionTask.loss`) +
backward + AdamW ``step()`` + ``zero_grad(set_to_none=True)`` over the trainable tensors, on fixed random images
with 1-4 random boxes each. Timing and memory as ``bench_step.py`` (interleaved rounds, medians; process CPU
time with one thread on CPU; peak memory growth during one step, optimizer state already allocated).

Usage::

    python benchmarks/bench_det.py                   # ViT-S/16, batch 4, 224 px
    python benchmarks/bench_det.py --quick           # tiny ViT, seconds
    python benchmarks/bench_det.py --detector retinanet --device cuda --batch 16 --threads 0
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any

import _common as C
import torch
from torch import nn

import vpeft
from vpeft.data.detection import TARGET_FIELDS
from vpeft.tasks.detection import DETECTORS, DetectionTask

CLASSES = tuple(f"piece{i}" for i in range(12))
METHODS = ("bitfit", "lora", "adaptformer", "vpt_deep", "ssf", "full")


@dataclasses.dataclass
class Case:
    name: str
    what: str
    kind: str  # forward | limit | train


def cases() -> list[Case]:
    out = [
        Case("forward", "backbone forward (no_grad)", "forward"),
        Case("limit", "all frozen, grad w.r.t. the input", "limit"),
        Case("frozen", "frozen backbone + detector", "train"),
    ]
    what = {"full": "full fine-tuning + detector"}
    return out + [Case(m, what.get(m, f"vpeft {m} + detector"), "train") for m in METHODS]


def targets(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """The dataset's padded ``(B, 4, 9)`` target rows: 1-4 random boxes per image, labels among the classes."""
    t = torch.zeros(batch, 4, len(TARGET_FIELDS))
    t[:, :, 0] = -1.0
    t[:, :, 7:] = 1.0  # stored = input pixels
    for i in range(batch):
        for j in range(1 + i % 4):
            xy = torch.rand(2, generator=generator) * size * 0.6
            wh = size * (0.1 + 0.3 * torch.rand(2, generator=generator))
            x2y2 = torch.minimum(xy + wh, torch.tensor(float(size)))
            label = float(torch.randint(0, len(CLASSES), (), generator=generator))
            t[i, j, :7] = torch.tensor([label, *xy, *x2y2, 0.0, float((x2y2 - xy).prod())])
    return t


def build(case: Case, args, device: torch.device) -> tuple[nn.Module, DetectionTask]:
    """The detection model of a case: the method is applied to the backbone, then the detector is built."""
    backbone = C.create_model(args.model, args.size, num_classes=0, quick=args.quick).to(device)
    task = DetectionTask(CLASSES, detector=args.detector, width=args.width)
    if case.kind == "train" and case.name not in ("frozen", "full"):
        vpeft.apply(backbone, case.name)
    elif case.name != "full":
        backbone.requires_grad_(False)
    model = task.build(backbone)
    if case.kind in ("forward", "limit"):
        model.requires_grad_(False)
    return model, task


def make_step(case: Case, model: nn.Module, task: DetectionTask, x, t) -> tuple[Callable[[], None], Any]:
    if case.kind == "forward":

        def forward() -> None:
            with torch.no_grad():
                model.backbone.forward_features(x)

        return forward, None
    if case.kind == "limit":

        def limit() -> None:
            task.loss(task.forward(model, x.detach().requires_grad_(True), t), t).backward()

        return limit, None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def train() -> None:
        task.loss(task.forward(model, x, t), t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train, opt


def _prime(opt) -> None:
    if opt is None:
        return
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def build_and_measure(case: Case, args, device, x, t, measure: bool):
    model, task = build(case, args, device)
    model.train(case.kind != "forward")
    detector = {id(p) for p in model.decoder.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    record: dict[str, Any] = {
        "config": case.name,
        "what": case.what,
        "trainable": sum(p.numel() for p in trainable),
        "method_params": sum(p.numel() for p in trainable if id(p) not in detector),
        "detector_params": sum(p.numel() for p in model.decoder.parameters()),
    }
    step, opt = make_step(case, model, task, x, t)
    C.trim()
    base = C.current_memory(device)
    _prime(opt)
    with C.PeakMemory(device, base) as peak:
        step()
    if measure:
        record["peak_mib"] = peak.growth / 2**20
    return step, record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--detector", default="fcos", choices=sorted(DETECTORS))
    p.add_argument("--width", type=int, default=None, help="pyramid / head width (default: the task's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="tiny ViT, batch 2, 2 repeats, width 32 (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.width = 2, min(args.repeats, 2), args.width or 32
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    device = torch.device(args.device)
    threads = C.set_threads(args.threads)
    measure = not args.no_memory and C.memory_supported(device)
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    t = targets(args.batch, size, g).to(device)

    exact = measure and device.type == "cpu" and C.exact_cpu_memory(True)
    steps, records = {}, {}
    for case in cases():
        print(f"building + warm-up: {case.name}", file=sys.stderr, flush=True)
        steps[case.name], records[case.name] = build_and_measure(case, args, device, x, t, measure)
    if exact:
        C.exact_cpu_memory(False)
    clock = C.pick_clock(device, threads)
    C.time_interleaved(steps, 1, device, progress=False)
    times = C.time_interleaved(steps, args.repeats, device, clock=clock)

    fwd, lim, frozen = (C.median(times[k]) for k in ("forward", "limit", "frozen"))
    lim_peak = records["limit"].get("peak_mib")
    rows = []
    for case in cases():
        r = records[case.name]
        r["step_s"] = C.median(times[case.name])
        r["x_forward"], r["x_limit"] = r["step_s"] / fwd, r["step_s"] / lim
        if case.kind == "train":
            r["x_frozen"] = r["step_s"] / frozen
        if r.get("peak_mib") is not None and lim_peak:
            r["x_limit_peak"] = r["peak_mib"] / lim_peak
        r["times_s"] = times[case.name]
        rows.append(r)
    model_desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    title = f"Detection step cost: {model_desc} + {args.detector}, batch {args.batch}, {size} px, fp32"
    print(C.header(title, device, threads, f", {args.repeats} rounds (median)", clock))
    print()
    columns = [
        ("config", "config", "s"),
        ("what", "what", "s"),
        ("method_params", "method params", ","),
        ("detector_params", "detector params", ","),
        ("step_s", "step s", ".4f"),
        ("x_forward", "x forward", ".2f"),
        ("x_frozen", "x frozen", ".2f"),
        ("x_limit", "x limit", ".3f"),
        ("peak_mib", "peak MiB", ".1f"),
        ("x_limit_peak", "peak x limit", ".2f"),
    ]
    print(C.table(rows, columns))
    print(
        f"\ndetector ({args.detector}): {records['frozen']['detector_params']:,} parameters; the frozen-backbone "
        f"step takes {frozen:.4f} s ({frozen / fwd:.2f}x the backbone forward, {frozen / lim:.2f}x the limit)"
    )
    C.write_json(args.json, {"args": vars(args), "threads": threads, "clock": clock, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
