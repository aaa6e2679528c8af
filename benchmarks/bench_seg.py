"""Cost of one semantic-segmentation training step per PEFT method vs the backbone forward and the limit.

Measured in one process on one random-init timm model (default ViT-S/16, batch 8, 224 px, fp32, 11 classes,
the ``linear`` decoder; ``--decoder fpn`` for the feature-pyramid head):

* ``forward``: the backbone's inference forward (``forward_features`` under ``torch.no_grad``), the unit of
  every "x forward" ratio;
* ``limit``: backbone and decoder frozen, the input requires grad, the per-pixel loss backpropagated to the
  input -- forward + activation gradients, no weight gradient: what any method that trains inside the backbone
  must pay; the unit of every "x limit" ratio;
* ``decoder``: the decoder's own step on precomputed (detached) features -- its share of each method's step is
  ``decoder s / step s``;
* one row per method: ``frozen`` (backbone frozen, decoder trained: the linear-probe analogue), ``bitfit``,
  ``lora``, ``adaptformer``, ``vpt_deep``, ``ssf`` (vpeft defaults) and ``full``.

A step is forward + loss + backward + AdamW ``step()`` + ``zero_grad(set_to_none=True)`` over the trainable
tensors. Timing and memory as ``bench_step.py`` (interleaved rounds, medians; process CPU time with one thread
on CPU; peak memory growth during one step over the memory before it, optimizer state already allocated:
sampled RSS with every allocation >= 64 KiB mmap'ed on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).

Usage::

    python benchmarks/bench_seg.py                   # ViT-S/16, batch 8, 224 px
    python benchmarks/bench_seg.py --quick           # tiny ViT, seconds
    python benchmarks/bench_seg.py --decoder fpn --device cuda --batch 32 --threads 0
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
from vpeft.tasks.segmentation import SegmentationTask

NUM_CLASSES = 11
METHODS = ("frozen", "bitfit", "lora", "adaptformer", "vpt_deep", "ssf", "full")


@dataclasses.dataclass
class Case:
    name: str
    what: str
    kind: str  # forward | limit | decoder | train


def cases() -> list[Case]:
    out = [
        Case("forward", "backbone forward (no_grad)", "forward"),
        Case("limit", "all frozen, grad w.r.t. the input", "limit"),
        Case("decoder", "decoder step on precomputed features", "decoder"),
    ]
    what = {"frozen": "frozen backbone + decoder", "full": "full fine-tuning + decoder"}
    return out + [Case(m, what.get(m, f"vpeft {m} + decoder"), "train") for m in METHODS]


def build(case: Case, args, device: torch.device) -> tuple[nn.Module, SegmentationTask]:
    """The segmentation model of a case: the method is applied to the backbone, then the decoder is built."""
    backbone = C.create_model(args.model, args.size, num_classes=0, quick=args.quick).to(device)
    task = SegmentationTask(NUM_CLASSES, decoder=args.decoder)
    if case.kind == "train" and case.name != "frozen":
        vpeft.apply(backbone, case.name)
    else:
        backbone.requires_grad_(False)
    model = task.build(backbone)
    if case.kind in ("forward", "limit"):
        model.requires_grad_(False)
    return model, task


def make_step(case: Case, model: nn.Module, task: SegmentationTask, x, y) -> tuple[Callable[[], None], Any]:
    if case.kind == "forward":

        def forward() -> None:
            with torch.no_grad():
                model.backbone.forward_features(x)

        return forward, None
    if case.kind == "limit":

        def limit() -> None:
            task.loss(model(x.detach().requires_grad_(True)), y).backward()

        return limit, None
    params = [p for p in (model.decoder if case.kind == "decoder" else model).parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    if case.kind == "decoder":
        with torch.no_grad():
            feats = [f.detach() for f in model.features(model.backbone, x)]

        def decoder() -> None:
            task.loss(model.decoder(feats), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return decoder, opt

    def train() -> None:
        task.loss(model(x), y).backward()
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


def build_and_measure(case: Case, args, device, x, y, measure: bool):
    model, task = build(case, args, device)
    model.train(case.kind != "forward")
    trainable = model.decoder if case.kind == "decoder" else model
    record: dict[str, Any] = {
        "config": case.name,
        "what": case.what,
        "trainable": sum(p.numel() for p in trainable.parameters() if p.requires_grad),
        "decoder_params": sum(p.numel() for p in model.decoder.parameters()),
    }
    step, opt = make_step(case, model, task, x, y)
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
    p.add_argument("--decoder", default="linear", choices=("linear", "fpn"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="tiny ViT, batch 2, 2 repeats (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 2, min(args.repeats, 2)
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    device = torch.device(args.device)
    threads = C.set_threads(args.threads)
    measure = not args.no_memory and C.memory_supported(device)
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch, size, size), generator=g).to(device)

    exact = measure and device.type == "cpu" and C.exact_cpu_memory(True)
    steps, records = {}, {}
    for case in cases():
        print(f"building + warm-up: {case.name}", file=sys.stderr, flush=True)
        steps[case.name], records[case.name] = build_and_measure(case, args, device, x, y, measure)
    if exact:
        C.exact_cpu_memory(False)
    clock = C.pick_clock(device, threads)
    C.time_interleaved(steps, 1, device, progress=False)
    times = C.time_interleaved(steps, args.repeats, device, clock=clock)

    fwd, lim, dec = (C.median(times[k]) for k in ("forward", "limit", "decoder"))
    lim_peak = records["limit"].get("peak_mib")
    rows = []
    for case in cases():
        r = records[case.name]
        r["step_s"] = C.median(times[case.name])
        r["x_forward"], r["x_limit"] = r["step_s"] / fwd, r["step_s"] / lim
        if case.kind == "train":
            r["decoder_share"] = dec / r["step_s"]
        if r.get("peak_mib") is not None and lim_peak:
            r["x_limit_peak"] = r["peak_mib"] / lim_peak
        r["times_s"] = times[case.name]
        rows.append(r)
    model_desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    title = f"Segmentation step cost: {model_desc} + {args.decoder} decoder, batch {args.batch}, {size} px, fp32"
    print(C.header(title, device, threads, f", {args.repeats} rounds (median)", clock))
    print()
    columns = [
        ("config", "config", "s"),
        ("what", "what", "s"),
        ("trainable", "trainable", ","),
        ("step_s", "step s", ".4f"),
        ("x_forward", "x forward", ".2f"),
        ("x_limit", "x limit", ".3f"),
        ("decoder_share", "decoder share", ".1%"),
        ("peak_mib", "peak MiB", ".1f"),
        ("x_limit_peak", "peak x limit", ".2f"),
    ]
    print(C.table(rows, columns))
    print(
        f"\ndecoder: {records['decoder']['decoder_params']:,} parameters, {dec:.4f} s per step "
        f"({dec / fwd:.2f}x the backbone forward)"
    )
    C.write_json(args.json, {"args": vars(args), "threads": threads, "clock": clock, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
