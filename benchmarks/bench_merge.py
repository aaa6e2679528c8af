"""Inference latency after ``vpeft.merge`` (mergeable methods) and the overhead of non-mergeable methods.

Every registered method that supports ViTs is applied with its defaults to the same random-init timm model
(default ViT-S/16, 224 px), its trainable tensors are given random non-zero values (so merging really
changes the weights), and then

* mergeable methods are merged (``keep_original=False``, the deployment setting): the table shows the
  largest output difference to the unmerged model, whether the merged model has exactly the plain
  backbone's module types and parameter shapes, and its latency relative to the plain backbone
  (target: within 1 %);
* non-mergeable methods (prompts, adapters, side networks) are timed as they are: their overhead.

Latency is an inference forward (``torch.inference_mode``, ``eval()``) of a batch of ``--batch`` images,
timed in process CPU time with one thread, else wall time (``_common.py``). After one warm-up call per model,
every model is timed ``--repeats`` times *in a pair with the plain backbone* (plain then model, or model then
plain, alternating). Two ratios are reported: the median over the pairs of ``model / plain`` (adjacent calls
see the same machine state) and the ratio of the fastest calls (``best``: the least disturbed run of each, as
``timeit`` recommends for equal work); the 1 % target is judged on the latter. A second copy of the plain backbone is
timed the same way (``plain backbone (copy)``): its ratio is the measurement's own noise floor. A merged model
has exactly the plain backbone's modules and shapes (column ``plain modules``), so it runs the same kernels;
its measured ratio can only differ from 1 by that noise. ``--threads 1`` (default) for the reason given in
``bench_step.py``.

Usage::

    python benchmarks/bench_merge.py            # ViT-S/16, batch 4 (about 10 min on one core)
    python benchmarks/bench_merge.py --quick    # tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import _common as C
import torch
from torch import nn

import vpeft


def _randomise(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * 0.02)


def _signature(model: nn.Module) -> list[Any]:
    return [type(m) for m in model.modules()] + [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def prepare(name: str, args, x: torch.Tensor, plain_sig: list[Any]) -> tuple[nn.Module | None, dict[str, Any]]:
    """Apply ``name``, randomise its delta, merge it when mergeable; returns (model or None, record)."""
    method = vpeft.get_method(name)
    record: dict[str, Any] = {"method": name, "mergeable": method.mergeable}
    model = C.create_model(args.model, args.size, quick=args.quick)
    try:
        vpeft.apply(model, name)
    except Exception as exc:  # a method that needs options (e.g. compose) or another backbone: report, go on
        record["note"] = f"skipped: {type(exc).__name__}: {str(exc)[:80]}"
        return None, record
    _randomise(model)
    model.eval()
    if method.mergeable:
        with torch.inference_mode():
            before = model(x)
        vpeft.merge(model, keep_original=False)
        with torch.inference_mode():
            record["max_abs_diff"] = (model(x) - before).abs().max().item()
        record["plain_modules"] = _signature(model) == plain_sig
    return model, record


def time_paired(
    fns: dict[str, Callable[[], None]], ref: str, repeats: int, device: torch.device, clock: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time every function next to ``fns[ref]``, ``repeats`` times.

    Returns (seconds per function, the reference's seconds in each function's own pairs), so that a function's
    fastest call is compared with the fastest reference call among equally many samples (the reference is timed
    once per pair, so its overall minimum would be biased low).
    """
    times: dict[str, list[float]] = {n: [] for n in fns}
    paired_ref: dict[str, list[float]] = {n: [] for n in fns if n != ref}
    names = [n for n in fns if n != ref]
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            pair = (ref, name) if r % 2 == 0 else (name, ref)
            got = {n: C.time_interleaved({n: fns[n]}, 1, device, progress=False, clock=clock)[n][0] for n in pair}
            for n, t in got.items():
                times[n].append(t)
            paired_ref[name].append(got[ref])
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return times, paired_ref


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--methods", default="", help="comma-separated methods (default: every ViT method)")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny ViT, batch 2, 3 repeats (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 2, min(args.repeats, 3)
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    threads = C.set_threads(args.threads)
    device = torch.device("cpu")
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    names = args.methods.split(",") if args.methods else vpeft.list_methods()
    names = [n for n in names if "vit" in vpeft.get_method(n).kinds]

    plain = C.create_model(args.model, args.size, quick=args.quick).eval()
    plain_sig = _signature(plain)
    control = C.create_model(args.model, args.size, quick=args.quick).eval()
    models = {"plain": plain, "plain (copy)": control}
    records = [
        {"method": "plain backbone", "mergeable": None},
        {"method": "plain (copy)", "mergeable": None, "plain_modules": True, "note": "noise floor"},
    ]
    for name in names:
        print(f"preparing {name}", file=sys.stderr, flush=True)
        model, record = prepare(name, args, x, plain_sig)
        records.append(record)
        if model is not None:
            models[name] = model

    def infer(model: nn.Module):
        def run() -> None:
            with torch.inference_mode():
                model(x)

        return run

    fns = {n: infer(m) for n, m in models.items()}
    clock = C.pick_clock(device, threads)
    C.time_interleaved(fns, 1, device, progress=False)  # warm-up
    times, paired_ref = time_paired(fns, "plain", args.repeats, device, clock)
    by_name = {r["method"]: r for r in records}
    by_name["plain"] = records[0]
    for n in models:
        r = by_name[n]
        r["latency_ms"] = 1e3 * C.median(times[n])
        ref = paired_ref.get(n, times[n])
        r["ratio"] = C.median([t / tr for t, tr in zip(times[n], ref)])
        r["ratio_best"] = min(times[n]) / min(ref)
        r["overhead_pct"] = 100 * (r["ratio_best"] - 1)
        if n not in ("plain", "plain (copy)"):
            r["target"] = ("met" if r["overhead_pct"] <= 1.0 else "NOT met") if r["mergeable"] else "n/a"

    desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    print(
        C.header(
            f"Inference latency after merge: {desc}, batch {args.batch}, {size} px, fp32",
            device,
            threads,
            f", {args.repeats} pairs with the plain backbone per model (median ratio)",
            clock,
        )
    )
    print()
    merged = [r for r in records if r["mergeable"] is not False]  # with the plain rows
    others = [r for r in records if r["mergeable"] is False]
    print("## Mergeable methods, merged (target: within 1 % of the plain backbone)\n")
    print(
        C.table(
            merged,
            [
                ("method", "method", "s"),
                ("latency_ms", "latency ms", ".1f"),
                ("ratio", "x plain (median pair)", ".4f"),
                ("ratio_best", "x plain (best)", ".4f"),
                ("overhead_pct", "overhead % (best)", "+.2f"),
                ("plain_modules", "plain modules", ""),
                ("max_abs_diff", "max |merged - unmerged|", ".1e"),
                ("target", "at most +1 %", "s"),
                ("note", "note", "s"),
            ],
        )
    )
    print("\n## Non-mergeable methods (overhead of the added modules)\n")
    print(
        C.table(
            others,
            [
                ("method", "method", "s"),
                ("latency_ms", "latency ms", ".1f"),
                ("ratio", "x plain (median pair)", ".3f"),
                ("ratio_best", "x plain (best)", ".3f"),
                ("overhead_pct", "overhead % (best)", "+.1f"),
                ("note", "note", "s"),
            ],
        )
    )
    done = [r for r in merged if r.get("target")]
    missed = [r["method"] for r in done if r["target"] != "met"]
    same = all(r.get("plain_modules") for r in done)
    floor = by_name["plain (copy)"]["overhead_pct"]
    print(
        f"\nmergeable methods within 1 %: {len(done) - len(missed)}/{len(done)}"
        + (f" (outside: {', '.join(missed)})" if missed else "")
        + f"; measurement noise floor (plain vs its copy): {floor:+.2f} %; every merged model has exactly the "
        + f"plain backbone's modules and shapes: {same}"
    )
    C.write_json(args.json, {"args": vars(args), "threads": threads, "clock": clock, "rows": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
