"""Cost of one training step of every PEFT method vs the forward pass and the activation-gradient limit.

Measured in one process on one random-init timm model (default ViT-S/16, batch 16, 224 px, fp32):

* ``forward``: inference forward pass (``torch.no_grad``), the unit of every "x forward" ratio;
* ``limit``: every weight frozen, the input requires grad, cross-entropy backward to the input -- the cost any
  method that backpropagates through the frozen backbone must pay (forward + activation gradients, no weight
  gradient); the unit of every "x limit" ratio;
* ``full``: full fine-tuning step (AdamW); ``linear``: linear probe (no backprop through the backbone);
* vpeft LoRA (rank ``--rank``, alpha = rank) on q,k,v (= the whole fused ``qkv``) and on the wide target set
  qkv+proj+fc1+fc2, with the fused autograd function and (``lora_wide_unfused``) with the plain-autograd
  reference path; Hugging Face PEFT LoRA with the same targets and rank (``pip install -e '.[bench]'``);
* adapter, VPT-deep, SSF and BitFit with vpeft's defaults;
* with ``--memory recompute`` (or ``half``, or ``recompute,half``), each of the limit and the vpeft rows that
  backpropagate through the backbone again as ``<name>_recompute`` / ``<name>_half``: every block (the first 2/3
  of them) recomputed in backward (``TrainConfig(memory=...)``), judged against the (default) limit: saved
  activations and peak memory <= 0.5x at a step <= 1.3x;
* with ``--tasks``, one step-cost table per task kind -- classification (these rows), segmentation
  (``bench_seg.py``), zero-shot CLIP (``bench_clip.py``), video (``bench_video.py``) and detection
  (``bench_det.py``), each run in this process with the same ``--quick`` / ``--threads`` / ``--device`` -- every
  PEFT step against its own backbone's activation-gradient limit, with a met / NOT met column (and the reason
  where a step is over its target).

A training step is forward + cross-entropy + backward + ``optimizer.step()`` + ``zero_grad(set_to_none=True)``
with AdamW over the trainable tensors only (vpeft's :func:`vpeft.train.build_optimizer`). Timing: the memory
step and one more warm-up round, then ``--repeats`` interleaved rounds, medians; process CPU time with one
thread on CPU, else wall time (see ``_common.py``).

Memory, measured during the warm-up step of a freshly built model (``_common.py`` explains the method):

* ``peak MiB``: peak growth of the process's memory during one training step over the memory held before it
  (the model's weights and the input batch), with the optimizer state already allocated (an AdamW step on
  zero gradients is taken first): activations + gradients + optimizer state + transient buffers. On CPU this
  is the sampled resident set with every allocation >= 64 KiB mmap'ed (so the resident set is the live bytes);
  on CUDA ``torch.cuda.max_memory_allocated``.
* ``saved MiB``: the distinct storages autograd saved for backward (``saved_tensors_hooks``), weights and
  the input excluded -- the activation memory, exact and noise-free.

Checks, per configuration, between backward and the optimizer step: no frozen tensor holds a ``.grad``, and
the optimizer holds no frozen tensor (so it can hold no state for one).

On a shared machine set ``--threads 1`` (the default): with more OpenMP threads than idle cores, every parallel
kernel waits for a scheduler slice (we measured 40 ms for sub-millisecond GEMMs at load 8 on 2 cores), which
swamps what is being measured. ``--threads 0`` uses torch's default.

Usage::

    python benchmarks/bench_step.py                      # ViT-S/16, batch 16, 224 px (~10 min on a free core)
    python benchmarks/bench_step.py --quick              # tiny ViT, seconds
    python benchmarks/bench_step.py --memory recompute,half --only lora_qkv,ssf   # + the recomputed rows
    python benchmarks/bench_step.py --quick --tasks     # + one table per task kind (tiny models, about a minute)
    python benchmarks/bench_step.py --model vit_base_patch16_224 --device cuda --batch 64 --threads 0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as C
import torch
import torch.nn.functional as F
from torch import nn

import vpeft
from vpeft.arch import get_family
from vpeft.arch.recompute import HALF
from vpeft.layers import LoRALinear
from vpeft.train import TrainConfig, build_optimizer

WIDE = ("qkv", "proj", "fc1", "fc2")
PEFT_TARGETS = {  # exact module paths of timm ViT blocks (a bare "proj" would also catch patch_embed.proj)
    ("qkv",): r".*blocks\.\d+\.attn\.qkv",
    WIDE: r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
}


@dataclasses.dataclass
class Case:
    name: str
    what: str
    kind: str  # forward | limit | train
    build: Callable[[nn.Module], tuple[nn.Module, torch.optim.Optimizer | None]]
    backprop: bool = True  # backpropagates through the backbone (judged against the limit)
    memory: str = "default"  # TrainConfig.memory: "recompute" (every block) / "half" (the first 2/3) recomputed

    @property
    def recompute(self) -> bool:
        return self.memory != "default"


RECOMPUTE_TARGET = 0.5  # saved activations and peak memory of a recomputed row, x the (default) limit's
RECOMPUTE_TIME = 1.3  # its step, x the (default) limit's
MEMORY_MODES = ("recompute", "half")
MEMORY_WHAT = {"recompute": "every block recomputed", "half": "first 2/3 of the blocks recomputed"}
SAVED_TARGET = {"lora_qkv": 1.15, "lora_wide": 1.15, "ssf": 1.15}  # saved activations x the limit's (issue 21)


def with_recompute(all_cases: list[Case], modes: tuple[str, ...] = ("recompute",)) -> list[Case]:
    """After each case that backpropagates through the backbone with vpeft (the limit included), the same case
    under each memory mode (``<name>_recompute``, ``<name>_half``); Hugging Face PEFT rows are left alone."""
    out = []
    for case in all_cases:
        out.append(case)
        if case.kind == "limit" or (case.backprop and not case.name.startswith("peft")):
            for mode in modes:
                what = f"{case.what}, {MEMORY_WHAT[mode]}"
                out.append(dataclasses.replace(case, name=f"{case.name}_{mode}", what=what, memory=mode))
    return out


def _vpeft(method: str, unfused: bool = False, **kwargs: Any):
    def build(model: nn.Module):
        vpeft.apply(model, method, **kwargs)
        if unfused:
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.fused = False
        return model, build_optimizer(model, TrainConfig())

    return build


def _peft(targets: tuple[str, ...], rank: int):
    def build(model: nn.Module):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=PEFT_TARGETS[targets], modules_to_save=["head"]
        )
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

    return build


def _frozen(model: nn.Module):
    return model.requires_grad_(False), None


def cases(rank: int, with_peft: bool) -> list[Case]:
    lora = {"r": rank, "alpha": float(rank)}
    out = [
        Case("forward", "inference forward (no_grad)", "forward", _frozen, backprop=False),
        Case("limit", "all frozen, grad w.r.t. the input", "limit", _frozen, backprop=False),
        Case("full", "full fine-tuning", "train", _vpeft("full"), backprop=False),
        Case("linear", "linear probe (head only)", "train", _vpeft("linear"), backprop=False),
        Case("lora_qkv", "vpeft LoRA q,k,v (fused)", "train", _vpeft("lora", targets=("qkv",), **lora)),
        Case("lora_wide", "vpeft LoRA qkv,proj,fc1,fc2 (fused)", "train", _vpeft("lora", targets=WIDE, **lora)),
        Case(
            "lora_wide_unfused",
            "vpeft LoRA wide, reference autograd",
            "train",
            _vpeft("lora", unfused=True, targets=WIDE, **lora),
        ),
    ]
    if with_peft:
        out += [
            Case("peft_qkv", "HF PEFT LoRA on qkv", "train", _peft(("qkv",), rank)),
            Case("peft_wide", "HF PEFT LoRA qkv,proj,fc1,fc2", "train", _peft(WIDE, rank)),
        ]
    out += [
        Case("adapter", "vpeft adapter (defaults)", "train", _vpeft("adapter")),
        Case("vpt_deep", "vpeft VPT-deep (defaults)", "train", _vpeft("vpt_deep")),
        Case("ssf", "vpeft SSF", "train", _vpeft("ssf")),
        Case("bitfit", "vpeft BitFit", "train", _vpeft("bitfit")),
    ]
    return out


def _check(model: nn.Module, opt: torch.optim.Optimizer | None) -> bool:
    """No frozen tensor holds a .grad; the optimizer holds (and so keeps state for) trainable tensors only."""
    if any(p.grad is not None for p in model.parameters() if not p.requires_grad):
        return False
    if opt is None:
        return True
    held = [p for g in opt.param_groups for p in g["params"]] + list(opt.state)
    return all(p.requires_grad for p in held)


def make_step(case: Case, model: nn.Module, opt, x, y, checks: list[bool] | None = None) -> Callable[[], None]:
    if case.kind == "forward":

        def forward() -> None:
            with torch.no_grad():
                model(x)

        return forward
    if case.kind == "limit":

        def limit() -> None:
            F.cross_entropy(model(x.detach().requires_grad_(True)), y).backward()
            if checks is not None:
                checks.append(_check(model, None))

        return limit

    def train() -> None:
        F.cross_entropy(model(x), y).backward()
        if checks is not None:
            checks.append(_check(model, opt))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train


def _prime(model: nn.Module, opt: torch.optim.Optimizer | None) -> None:
    """Allocate the optimizer state (an AdamW step on zero gradients) so the measured step includes it."""
    if opt is None:
        return
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def build_and_measure(case: Case, args, device: torch.device, x, y, measure: bool):
    """Build the case's model, take its warm-up step while measuring memory; returns (step, record)."""
    model = C.create_model(args.model, args.size, quick=args.quick).to(device)
    model, opt = case.build(model)
    if case.recompute:
        get_family(model).recompute_blocks(model, fraction=HALF if case.memory == "half" else 1.0)
    model.train(case.kind != "forward")
    record: dict[str, Any] = {
        "config": case.name,
        "what": case.what,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    checks: list[bool] = []
    step = make_step(case, model, opt, x, y, checks)
    C.trim()
    base = C.current_memory(device)
    _prime(model, opt)
    exclude = [*model.parameters(), *model.buffers(), x]
    with C.SavedBytes(exclude) as saved, C.PeakMemory(device, base) as peak:
        step()
    if measure:
        record["peak_mib"] = peak.growth / 2**20
    record["saved_mib"] = saved.total / 2**20
    record["checks_ok"] = all(checks) if checks else None
    return make_step(case, model, opt, x, y), record


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def time_change(speed: float) -> str:
    """A speed ratio (their step time / ours) as the time it saves or costs: ``1.2`` -> ``16.7% less time``,
    ``0.8`` -> ``25.0% more time``."""
    if speed >= 1:
        return f"{100 * (1 - 1 / speed):.1f}% less time"
    return f"{100 * (1 / speed - 1):.1f}% more time"


FULL_SETTING = "vit_small_patch16_224, batch 16, 224 px, one CPU thread"


def summarise(rows: list[dict[str, Any]], by: dict[str, dict[str, Any]], judge: bool = True) -> list[str]:
    """The ratios against the step-cost targets; ``judge=False`` (``--quick``, a tiny ViT) prints the ratios
    without a met / NOT met verdict, since the targets are set for the full setting."""
    if judge:
        lines = ["", "## Targets"]
    else:
        lines = ["", f"## Targets (not judged: --quick runs a tiny ViT; the targets are for {FULL_SETTING})"]

    def verdict(ok: bool, target: str) -> str:
        return f" -> {'met' if ok else 'NOT met'} ({target})" if judge else f" (target {target})"

    for r in rows:
        x_saved = _ratio(r["saved_mib"], by["limit"]["saved_mib"])
        if r.get("recompute"):
            peak = r.get("x_limit_peak")
            ok = x_saved <= RECOMPUTE_TARGET and r["x_limit"] <= RECOMPUTE_TIME and (peak or 0) <= RECOMPUTE_TARGET
            lines.append(
                f"- {r['config']}: saved activations {r['saved_mib']:.1f} MiB = {x_saved:.3f}x the limit's, "
                + ("" if peak is None else f"peak {peak:.3f}x, ")
                + f"step {r['x_limit']:.3f}x the limit"
                + verdict(ok, f"saved and peak <= {RECOMPUTE_TARGET}x at step <= {RECOMPUTE_TIME}x")
            )
        elif r.get("backprop"):
            lines.append(f"- {r['config']}: {r['x_limit']:.3f}x the limit{verdict(r['x_limit'] <= 1.05, '<= 1.05x')}")
            if r["config"] in SAVED_TARGET:
                target = SAVED_TARGET[r["config"]]
                lines.append(
                    f"  saved activations {r['saved_mib']:.1f} MiB = {x_saved:.3f}x the limit's"
                    + verdict(x_saved <= target, f"<= {target}x")
                )
    for tag in ("qkv", "wide"):
        ours, theirs = by.get(f"lora_{tag}"), by.get(f"peft_{tag}")
        if ours and theirs:
            speed = theirs["step_s"] / ours["step_s"]
            target = ">= 1.25x" if tag == "wide" else ">= 1.0x"
            ok = speed >= (1.25 if tag == "wide" else 1.0)
            lines.append(
                f"- LoRA {tag}: vpeft {ours['step_s']:.3f} s vs PEFT {theirs['step_s']:.3f} s per step: "
                f"{speed:.3f}x PEFT's speed ({time_change(speed)}){verdict(ok, target)}"
            )
            if ours.get("peak_mib") and theirs.get("peak_mib"):
                lines.append(
                    f"  peak memory: vpeft {ours['peak_mib']:.0f} MiB, PEFT {theirs['peak_mib']:.0f} MiB, "
                    f"{ours['x_limit_peak']:.2f}x the limit's (target <= 1.10x)"
                )
    checks = [r["config"] for r in rows if r.get("checks_ok") is False]
    lines.append(
        "- frozen tensors: no .grad and no optimizer state in any configuration"
        if not checks
        else f"- FAILED frozen-tensor checks: {checks}"
    )
    return lines


# ---- --tasks: one step-cost table per task kind ---------------------------------------------------------------
TASK_BENCHES = {  # task kind: the bench script that measures it (each has a limit row and writes x_limit)
    "segmentation": "bench_seg",
    "zero-shot CLIP": "bench_clip",
    "video": "bench_video",
    "detection": "bench_det",
}
TASK_TARGET = 1.10  # a PEFT step x its backbone's activation-gradient limit (issue 21: "anything over 1.1x")
NOT_JUDGED = {"forward", "limit", "decoder", "zero-shot forward", "zero-shot, text uncached"}
NOT_PEFT = {"full"}  # not a PEFT step: shown, not judged
REASONS = {  # why a step is over its target, by configuration
    "vpt_deep": "prompt tokens lengthen the sequence in every block (more tokens than the limit's)",
    "coop": "the limit backpropagates through the image tower only; CoOp runs the text tower forward and backward "
    "over the C class prompts every step",
    "cocoop": "the text tower runs forward and backward over B x C prompts (one per image and class) every step",
    "maple": "prompts in both towers: the text tower forward and backward over the C prompts every step",
    "clip_lora": "LoRA in both towers: the text tower forward and backward over the C prompts every step",
    "lora": "on the video task: the temporal head's backward on top of the frame-wise limit",
}


def run_task_bench(module: str, args) -> list[dict[str, Any]]:
    """Run one task's bench script in this process (its own tables to stderr); its JSON rows."""
    bench = importlib.import_module(module)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        argv = ["--json", str(out), "--threads", str(args.threads), "--device", args.device]
        with contextlib.redirect_stdout(sys.stderr):
            bench.main([*argv, *(["--quick"] if args.quick else [])])
        return json.loads(out.read_text())["rows"]


def _task_verdict(config: str, x_limit: float, judge: bool) -> tuple[str, str]:
    if config in NOT_JUDGED:
        return "-", ""
    if config in NOT_PEFT:
        return "not PEFT", "weight gradients and AdamW state for every weight"
    if not judge:
        return f"not judged (--quick; target <= {TASK_TARGET}x)", ""
    if x_limit <= TASK_TARGET:
        return "met", ""
    return "NOT met", REASONS.get(config, "no reason known yet")


def task_tables(classification: list[dict[str, Any]], args) -> list[str]:
    """One step-cost table per task kind: each step x its backbone's limit, met / NOT met against the target."""
    limit_saved = next(r["saved_mib"] for r in classification if r["config"] == "limit")
    rows = [r for r in classification if not r.get("recompute")]
    kinds = {"classification": [{**r, "saved_x_limit": _ratio(r["saved_mib"], limit_saved)} for r in rows]}
    for kind, module in TASK_BENCHES.items():
        print(f"task kind: {kind} ({module}.py)", file=sys.stderr, flush=True)
        kinds[kind] = run_task_bench(module, args)
    lines = [
        "",
        f"## Step cost per task kind (x the same backbone's activation-gradient limit; target <= {TASK_TARGET}x)",
    ]
    columns = [("config", "config", "s"), ("x_limit", "step x limit", ".3f"), ("memory", "memory x limit", "s")]
    columns += [("verdict", "met", "s"), ("reason", "reason", "s")]
    for kind, rows in kinds.items():
        table = []
        for r in rows:
            config = r.get("config") or r["name"]
            verdict, reason = _task_verdict(config, r["x_limit"], judge=not args.quick)
            memory = r.get("x_limit_peak", r.get("mem_x_limit"))
            saved = r.get("saved_x_limit")
            mem = "-" if memory is None else f"peak {memory:.2f}" + ("" if saved is None else f", saved {saved:.2f}")
            table.append({**r, "config": config, "memory": mem, "verdict": verdict, "reason": reason})
        lines += ["", f"### {kind}", "", C.table(table, columns)]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default="", help="comma-separated configurations (forward and limit always run)")
    p.add_argument("--no-peft", action="store_true", help="skip the Hugging Face PEFT rows")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="tiny ViT, batch 2, 2 repeats (a smoke test)")
    p.add_argument(
        "--memory",
        default="default",
        help="default, or comma-separated modes of " + ", ".join(MEMORY_MODES) + ": also run each vpeft row (and "
        "the limit) with TrainConfig(memory=mode)",
    )
    p.add_argument("--tasks", action="store_true", help="also one step-cost table per task kind (other benches)")
    args = p.parse_args(argv)
    modes = () if args.memory == "default" else tuple(args.memory.split(","))
    bad = [m for m in modes if m not in MEMORY_MODES]
    if bad:
        p.error(f"--memory {args.memory!r} is invalid: expected default or comma-separated {', '.join(MEMORY_MODES)}")
    if args.quick:
        args.batch, args.repeats = 2, min(args.repeats, 2)
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    device = torch.device(args.device)
    threads = C.set_threads(args.threads)
    try:
        import peft  # noqa: F401
    except ImportError:
        if not args.no_peft:
            print("peft is not installed (pip install -e '.[bench]'): skipping the PEFT rows", file=sys.stderr)
        args.no_peft = True
    all_cases = cases(args.rank, not args.no_peft)
    if args.only:
        keep = {"forward", "limit", *args.only.split(",")}
        all_cases = [c for c in all_cases if c.name in keep]
    if modes:
        all_cases = with_recompute(all_cases, modes)
    measure = not args.no_memory and C.memory_supported(device)
    g = torch.Generator().manual_seed(0)
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    exact = measure and device.type == "cpu" and C.exact_cpu_memory(True)
    steps, records = {}, {}
    for case in all_cases:
        print(f"building + warm-up: {case.name}", file=sys.stderr, flush=True)
        steps[case.name], records[case.name] = build_and_measure(case, args, device, x, y, measure)
    if exact:
        C.exact_cpu_memory(False)
    clock = C.pick_clock(device, threads)
    print("warm-up round (after the memory phase)", file=sys.stderr, flush=True)
    C.time_interleaved(steps, 1, device, progress=False)
    times = C.time_interleaved(steps, args.repeats, device, clock=clock)

    rows = []
    fwd, lim = C.median(times["forward"]), C.median(times["limit"])
    lim_peak = records["limit"].get("peak_mib")
    full_peak = records.get("full", {}).get("peak_mib")
    for case in all_cases:
        r = records[case.name]
        r["step_s"] = C.median(times[case.name])
        r["x_forward"], r["x_limit"] = r["step_s"] / fwd, r["step_s"] / lim
        r["x_limit_peak"] = _ratio(r.get("peak_mib"), lim_peak)
        r["x_full_peak"] = _ratio(r.get("peak_mib"), full_peak)
        r["backprop"] = case.backprop
        r["recompute"] = case.recompute
        r["times_s"] = times[case.name]
        rows.append(r)
    model_desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    print(
        C.header(
            f"Training step cost: {model_desc}, batch {args.batch}, {size} px, fp32",
            device,
            threads,
            f", {args.repeats} rounds (median)",
            clock,
        )
    )
    print()
    columns = [
        ("config", "config", "s"),
        ("what", "what", "s"),
        ("trainable", "trainable", ","),
        ("step_s", "step s", ".3f"),
        ("x_forward", "x forward", ".2f"),
        ("x_limit", "x limit", ".3f"),
        ("peak_mib", "peak MiB", ".0f"),
        ("x_limit_peak", "peak x limit", ".2f"),
        ("x_full_peak", "peak x full", ".2f"),
        ("saved_mib", "saved act MiB", ".1f"),
        ("checks_ok", "frozen ok", ""),
    ]
    print(C.table(rows, columns))
    print("\n".join(summarise(rows, records, judge=not args.quick)))
    if args.tasks:
        print("\n".join(task_tables(rows, args)))
    C.write_json(args.json, {"args": vars(args), "threads": threads, "clock": clock, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
