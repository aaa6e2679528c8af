"""Training-step options measured against the plain fp32 step: which ones win, on which backbone.

Each option is measured on one model and one PEFT method, against the same model and method without the option,
in one run (interleaved rounds, medians, process CPU time with one thread on CPU; see ``_common.py``):

* ViT (default ViT-S/16, batch 8, 224 px) with vpeft LoRA r=8 on q,v (the paper setting):
  ``bf16`` (forward under ``torch.autocast(bfloat16)``, the trainer's ``TrainConfig.bf16``), ``compile``
  (``torch.compile`` of the adapted model; its compile time is reported apart), ``checkpointing`` (timm's
  ``set_grad_checkpointing``: the blocks' activations are recomputed in backward -- time traded for memory),
  ``unfused`` (LoRA through the plain-autograd reference path instead of vpeft's fused LoRA function: the
  fused function's gain);
* CNN (default timm ``efficientnet_b0``, same batch and size) with BitFit: ``bf16``, ``channels_last``
  (weights and input in NHWC memory format), ``compile``, ``checkpointing`` where the model supports it.

For each option: step time x the baseline, peak memory x the baseline (``_common.py`` explains how peak
memory is measured), and a verdict: an option *wins* if it is at least 3 % faster without using more than 3 %
more memory (peak growth during a training step after a warm-up step, so the optimizer state is already
allocated); ``checkpointing`` is judged as a trade (memory saved per unit of extra time), never as a default.
Every configuration also checks that each trainable tensor received a gradient (gradient checkpointing with
re-entrant checkpoints silently drops the gradients of a frozen backbone's adapters: this would show here).

Usage::

    python benchmarks/bench_options.py            # ViT-S/16 + EfficientNet-B0, batch 8, 224 px (~10 min on a free core)
    python benchmarks/bench_options.py --quick    # tiny models, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import _common as C
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.layers import LoRALinear
from vpeft.train import TrainConfig, build_optimizer


@dataclasses.dataclass
class Setup:
    family: str  # "vit" | "cnn"
    model: str
    method: str
    settings: dict[str, Any]


@dataclasses.dataclass
class Option:
    name: str
    what: str
    families: tuple[str, ...]


OPTIONS = [
    Option("baseline", "fp32, no option", ("vit", "cnn")),
    Option("bf16", "forward under torch.autocast(bfloat16)", ("vit", "cnn")),
    Option("channels_last", "NHWC memory format (weights and input)", ("cnn",)),
    Option("compile", "torch.compile(model)", ("vit", "cnn")),
    Option("checkpointing", "timm set_grad_checkpointing (recompute in backward)", ("vit", "cnn")),
    Option("unfused", "LoRA through plain autograd (no fused function)", ("vit",)),
]


def create(setup: Setup, size: int, quick: bool) -> nn.Module:
    if setup.family == "vit":
        return C.create_model(setup.model, size, quick=quick)
    torch.manual_seed(0)  # --quick: the same CNN at the tiny input size
    return timm.create_model(setup.model, pretrained=False, num_classes=10)


def build(setup: Setup, option: str, args, device: torch.device, x: torch.Tensor):
    """The adapted model with ``option`` applied, its optimizer and the (possibly NHWC) input."""
    model = create(setup, args.size, args.quick).to(device)
    vpeft.apply(model, setup.method, **setup.settings)
    opt = build_optimizer(model, TrainConfig())
    model.train()
    if option == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif option == "checkpointing":
        if not hasattr(model, "set_grad_checkpointing"):
            raise RuntimeError(f"{setup.model} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    elif option == "unfused":
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.fused = False
    elif option == "compile":
        model = torch.compile(model)
    return model, opt, x


def make_step(model: nn.Module, opt, x, y, bf16: bool, grads: list[bool] | None = None) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        if grads is not None:
            grads.append(all(p.grad is not None for p in params))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(setup: Setup, option: str, args, device: torch.device, x, y) -> tuple[Callable[[], None], dict]:
    record: dict[str, Any] = {"family": setup.family, "model": setup.model, "method": setup.method, "option": option}
    model, opt, xo = build(setup, option, args, device, x)
    grads: list[bool] = []
    step = make_step(model, opt, xo, y, option == "bf16", grads)
    start = time.perf_counter()
    step()  # warm-up: allocates the optimizer state and lazy buffers; compiles under ``compile``
    if option == "compile":
        record["compile_s"] = time.perf_counter() - start
    C.trim()
    base = C.current_memory(device)
    with C.PeakMemory(device, base) as peak:
        step()
    if args.measure:
        record["peak_mib"] = peak.growth / 2**20
    record["all_grads"] = all(grads)
    return make_step(model, opt, xo, y, option == "bf16"), record


def verdict(r: dict[str, Any]) -> str:
    if r["option"] == "baseline":
        return "-"
    if not r.get("all_grads", True):
        return "BROKEN (a trainable tensor got no gradient)"
    t, m = r["x_time"], r.get("x_peak")
    if r["option"] == "checkpointing":
        if m is None:
            return f"trade: {t:.2f}x time"
        return f"trade: {t:.2f}x time for {m:.2f}x memory"
    if r["option"] == "unfused":
        return f"unfused takes {t:.2f}x the fused LoRA's time" + (f" and {m:.2f}x its memory" if m else "")
    wins = t <= 0.97 and (m is None or m <= 1.03)
    return "wins" if wins else "loses"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vit", default="vit_small_patch16_224")
    p.add_argument("--cnn", default="efficientnet_b0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default="", help="comma-separated options (the baseline always runs)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="tiny models, batch 2, 1 repeat, no compile (a smoke test)")
    args = p.parse_args(argv)
    options = [o for o in OPTIONS if not args.only or o.name in {"baseline", *args.only.split(",")}]
    if args.quick:
        args.batch, args.repeats = 2, 1
        options = [o for o in options if o.name != "compile"]  # compiling takes minutes, not a smoke test
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    device = torch.device(args.device)
    threads = C.set_threads(args.threads)
    args.measure = not args.no_memory and C.memory_supported(device)
    setups = [
        Setup("vit", args.vit, "lora", {"r": 8, "targets": ("q", "v")}),
        Setup("cnn", args.cnn, "bitfit", {}),
    ]
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    exact = args.measure and device.type == "cpu" and C.exact_cpu_memory(True)
    steps: dict[str, Callable[[], None]] = {}
    records: dict[str, dict[str, Any]] = {}
    for setup in setups:
        for o in options:
            if setup.family not in o.families:
                continue
            key = f"{setup.family}/{o.name}"
            print(f"building + warm-up: {key}", file=sys.stderr, flush=True)
            try:
                steps[key], records[key] = measure(setup, o.name, args, device, x, y)
            except Exception as e:  # an option that does not run here is a result, not a crash
                records[key] = {"family": setup.family, "model": setup.model, "method": setup.method}
                records[key].update(option=o.name, error=f"{type(e).__name__}: {e}"[:200])
            records[key]["what"] = o.what
    if exact:
        C.exact_cpu_memory(False)
    clock = C.pick_clock(device, threads)
    print("warm-up round (after the memory phase)", file=sys.stderr, flush=True)
    C.time_interleaved(steps, 1, device, progress=False)
    times = C.time_interleaved(steps, args.repeats, device, clock=clock)

    rows = []
    for key, r in records.items():
        if key in times:
            base = f"{r['family']}/baseline"
            r["step_s"] = C.median(times[key])
            r["x_time"] = r["step_s"] / C.median(times[base])
            b_peak, peak = records[base].get("peak_mib"), r.get("peak_mib")
            r["x_peak"] = peak / b_peak if peak is not None and b_peak else None
            r["verdict"] = verdict(r)
        else:
            r["verdict"] = f"did not run: {r['error']}"
        rows.append(r)
    desc = "tiny ViT + tiny EfficientNet (--quick)" if args.quick else f"{args.vit} + {args.cnn}"
    print(
        C.header(
            f"Training-step options: {desc}, batch {args.batch}, {size} px",
            device,
            threads,
            f", {args.repeats} rounds (median)",
            clock,
        )
    )
    print()
    columns = [
        ("family", "backbone", "s"),
        ("method", "method", "s"),
        ("option", "option", "s"),
        ("what", "what", "s"),
        ("step_s", "step s", ".3f"),
        ("x_time", "x time", ".3f"),
        ("peak_mib", "peak MiB", ".0f"),
        ("x_peak", "x memory", ".2f"),
        ("compile_s", "compile s", ".1f"),
        ("verdict", "verdict", "s"),
    ]
    print(C.table(rows, columns))
    C.write_json(args.json, {"args": vars(args), "threads": threads, "clock": clock, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
