"""Cost of one training step of every video method at T frames vs the frame-wise forward and the activation-gradient
limit, in one process on one random-init timm ViT (default ViT-S/16, 4 clips of 8 frames, 224 px, fp32).

Every configuration is a :class:`vpeft.tasks.VideoModel` (the backbone run frame-wise on ``B * T`` images):

* ``forward``: inference forward of the frame-wise model with the mean head (``torch.no_grad``): the unit of
  every "x forward" ratio;
* ``limit``: every weight frozen, the clips require grad, cross-entropy backward to the input -- what any method
  that backpropagates through the frozen backbone must pay; the unit of every "x limit" ratio (time and memory);
* ``linear_mean`` / ``linear_temporal``: the frozen backbone with the mean / temporal head (no backprop through it);
* ``lora`` (frame-wise, temporal head), ``aim``, ``st_adapter``, ``zeroi2v`` (mean head) with vpeft's defaults.

A training step is forward + cross-entropy + backward + ``AdamW.step()`` + ``zero_grad(set_to_none=True)`` over the
trainable tensors. Timing: one warm-up step, then ``--repeats`` interleaved rounds, medians (process CPU time with
one thread on CPU, else wall time; see ``_common.py``). Memory, during the warm-up step of a freshly built model:
``peak MiB`` (growth over the memory held before the step, optimizer state allocated first; CPU: sampled RSS with
every allocation >= 64 KiB mmap'ed; CUDA: max allocated) and ``saved MiB`` (storages autograd saved for backward,
weights and the input excluded).

Usage::

    python benchmarks/bench_video.py                   # ViT-S/16, 4 x 8 frames, 224 px (minutes on a free core)
    python benchmarks/bench_video.py --quick           # tiny ViT, 1 x 4 frames, seconds
    python benchmarks/bench_video.py --device cuda --clips 16 --threads 0
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import _common as C
import torch
import torch.nn.functional as F

import vpeft
from vpeft.tasks import VideoTask

K = 10
#: (name, method or None, head, description)
CASES: list[tuple[str, str | None, str, str]] = [
    ("forward", None, "mean", "frame-wise forward, mean head, no grad"),
    ("limit", None, "mean", "frozen, backward to the input"),
    ("linear_mean", "linear", "mean", "frozen backbone + mean head"),
    ("linear_temporal", "linear", "temporal", "frozen backbone + temporal head"),
    ("lora", "lora", "temporal", "LoRA frame-wise + temporal head"),
    ("aim", "aim", "mean", "AIM"),
    ("st_adapter", "st_adapter", "mean", "ST-Adapter"),
    ("zeroi2v", "zeroi2v", "mean", "ZeroI2V (unmerged)"),
]


def build(args, case: tuple[str, str | None, str, str], device: torch.device):
    name, method, head, _ = case
    backbone = C.create_model(args.model, args.size, num_classes=0, quick=args.quick)
    model = VideoTask(K, num_frames=args.frames, head=head).build(backbone).to(device)
    if method is not None:
        vpeft.apply(model, method)
    else:
        model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, opt


def make_step(name: str, model, opt, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    if name == "forward":

        def forward() -> None:
            with torch.no_grad():
                model(x)

        return forward
    if name == "limit":

        def limit() -> None:
            xg = x.detach().requires_grad_(True)
            F.cross_entropy(model(xg), y).backward()

        return limit

    def train() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train


def _prime(opt) -> None:
    """Allocate the optimizer state (an AdamW step on zero gradients) before memory is measured."""
    if opt is None:
        return
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (random init)")
    p.add_argument("--size", type=int, default=224, help="frame size in pixels")
    p.add_argument("--clips", type=int, default=4, help="clips per batch")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (T)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny ViT, 1 clip of 4 frames, 2 repeats (a smoke test)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.frames, args.repeats = 1, 4, 2
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    device = torch.device(args.device)
    threads = C.set_threads(args.threads)
    clock = C.pick_clock(device, threads)
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.clips, args.frames, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, K, (args.clips,), generator=gen).to(device)
    measure = C.memory_supported(device)
    C.exact_cpu_memory(measure and device.type == "cpu")

    rows, steps = [], {}
    for case in CASES:
        name = case[0]
        C.trim()
        model, opt = build(args, case, device)
        _prime(opt)
        step = make_step(name, model, opt, x, y)
        weights = [t for t in model.parameters()] + [x]
        C.trim()
        base = C.current_memory(device)
        with C.PeakMemory(device, base) as mem, C.SavedBytes(weights) as saved:
            step()
        C.sync(device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                "config": name,
                "what": case[3],
                "trainable": trainable,
                "peak_mib": mem.growth / 2**20 if measure else None,
                "saved_mib": saved.total / 2**20,
            }  # fmt: skip
        )
        step()  # one more warm-up
        steps[name] = step
    times = C.time_interleaved(steps, args.repeats, device, clock=clock)
    by = {r["config"]: r for r in rows}
    for r in rows:
        r["ms"] = 1000 * C.median(times[r["config"]])
    for r in rows:
        r["x_forward"] = _ratio(r["ms"], by["forward"]["ms"])
        r["x_limit"] = _ratio(r["ms"], by["limit"]["ms"])
        r["mem_x_limit"] = _ratio(r["peak_mib"], by["limit"]["peak_mib"])
        r["saved_x_limit"] = _ratio(r["saved_mib"], by["limit"]["saved_mib"])

    model_desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    extra = f", {model_desc}, {args.clips} clips x {args.frames} frames at {size} px, {args.repeats} repeats"
    print(C.header("Video training step vs the frame-wise forward and the activation-gradient limit", device,
                   threads, extra, clock))  # fmt: skip
    print()
    cols = [("config", "config", ""), ("what", "what", ""), ("trainable", "trainable", ","), ("ms", "ms", ".1f"),
            ("x_forward", "x forward", ".2f"), ("x_limit", "x limit", ".2f"), ("peak_mib", "peak MiB", ".1f"),
            ("mem_x_limit", "mem x limit", ".2f"), ("saved_mib", "saved MiB", ".1f"),
            ("saved_x_limit", "saved x limit", ".2f")]  # fmt: skip
    print(C.table(rows, cols))
    C.write_json(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
