"""Many tasks on one frozen backbone: one mixed batch through ``vpeft.MultiTaskModel`` vs N single-task models.

N task deltas are trained-like (random non-zero values: timing does not depend on them) on the same
random-init timm model (default ViT-S/16, 224 px), each with its own head size, and saved as delta files. Two
task sets: ``lora`` (N x LoRA r=8 on q, v, different seeds and heads) and ``mixed`` (LoRA q,v r=8, a Pfeiffer
adapter, LoRA r=16 on q,k,v,fc1, AdaptFormer, repeated up to N). A batch of ``--batch`` images has its samples
interleaved over the N tasks (sample i belongs to task i mod N). Compared, on the same batch:

* the multi-task model (one shared backbone, every delta file loaded by ``MultiTaskModel.from_deltas``) on the
  mixed batch, with per-sample selection ``grouped`` (the default: the batch is sorted by task, each task group
  of a LoRA'd Linear is one GEMM with a temporary merged weight) and ``gather`` (per-sample weight copies,
  batched ``bmm``);
* N separate single-task models (each a full backbone, loaded from its delta file and merged when the method
  is mergeable), each run on its own task's samples, one after another (the same images in all);
* the plain backbone on the whole batch (the floor of one pass), and on the N per-task chunks one after another
  (the floor of the separate models: on a CPU, smaller batches can run faster per image, cache effects).

Throughput is images per second of an inference forward (``torch.inference_mode``, ``eval()``), timed in
process CPU time with one thread, else wall time (``_common.py``): one warm-up round, then ``--repeats``
interleaved rounds (order rotated every round); ratios are medians of per-round ratios. The largest difference
between the multi-task logits and the separate models' logits is printed as a check.

Whole-model differences between the selections are a few percent, below the noise of a shared machine, so the
selections (and ``grouped`` without the merged-weight GEMMs: the low-rank term as two thin GEMMs per group) are
also timed on single layers of block 0 (its ``qkv``, and its MLP where adapted) against the frozen layer, with
the inputs of the mixed batch, in ``--layer-rounds`` short interleaved rounds. Memory: bytes of the
distinct tensors (parameters and buffers) each set-up holds: the multi-task model vs N full copies, and the
deltas themselves.

Usage::

    python benchmarks/bench_multitask.py            # ViT-S/16, 224 px, batch 32, 4 tasks (a few minutes, one core)
    python benchmarks/bench_multitask.py --quick    # tiny ViT, seconds
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common as C
import torch
from torch import nn

import vpeft
from vpeft.api import read_delta
from vpeft.multitask import MultiTaskLayer, MultiTaskModel, _Route

TASK_SETS = {
    "lora": [("lora", {"r": 8, "targets": ["q", "v"]})],
    "mixed": [
        ("lora", {"r": 8, "targets": ["q", "v"]}),
        ("adapter", {"bottleneck": 8}),
        ("lora", {"r": 16, "targets": ["qkv", "fc1"]}),
        ("adaptformer", {"bottleneck": 8}),
    ],
}
CLASSES = (10, 37, 100, 200)  # head sizes, cycled over the tasks
# configuration -> (selection, fold LoRA groups into a temporary merged weight)
MULTI = {
    "multi-task, grouped": ("grouped", True),
    "multi-task, grouped, no fold": ("grouped", False),
    "multi-task, gather": ("gather", False),
}
FULL = ("multi-task, grouped", "multi-task, gather")  # timed as whole models (all three: layer by layer)
SEPARATE, PLAIN, PLAIN_CHUNKS = "N separate models", "plain backbone", "plain backbone, per-task chunks"


def nbytes(*modules: nn.Module) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def backbone(args, num_classes: int = CLASSES[0]) -> nn.Module:
    """The shared frozen backbone (seeded: the same weights every call), with a head of ``num_classes``."""
    model = C.create_model(args.model, args.size, quick=args.quick)
    if num_classes != CLASSES[0]:
        model.reset_classifier(num_classes)
    return model.eval()


def make_deltas(args, task_set: str, folder: Path) -> tuple[dict[str, Path], list[tuple[str, dict, int]]]:
    """Save N task deltas (random non-zero values); returns their paths and (method, options, classes)."""
    specs, paths = [], {}
    for i in range(args.tasks):
        method, options = TASK_SETS[task_set][i % len(TASK_SETS[task_set])]
        classes = CLASSES[i % len(CLASSES)]
        model = backbone(args, classes)
        vpeft.apply(model, method, **options)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        name = f"task{i}-{method}"
        paths[name] = vpeft.save(model, folder / f"{name}.safetensors")
        specs.append((method, options, classes))
    return paths, specs


def run_task_set(args, task_set: str, x: torch.Tensor, ids: torch.Tensor, clock: str) -> dict[str, Any]:
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[{task_set}] saving {args.tasks} deltas", file=sys.stderr, flush=True)
        paths, specs = make_deltas(args, task_set, Path(tmp))
        delta_bytes = sum(t.numel() * t.element_size() for p in paths.values() for t in read_delta(p)[1].values())
        multi = {}
        for label, (selection, fold) in MULTI.items():
            MultiTaskLayer.fold = fold
            multi[label] = MultiTaskModel.from_deltas(backbone(args), paths, selection=selection)
        MultiTaskLayer.fold = True
        separate = []
        for (method, _, classes), path in zip(specs, paths.values()):
            model = backbone(args, classes)
            vpeft.load(model, path)
            if vpeft.get_method(method).mergeable:
                vpeft.merge(model, keep_original=False)
            separate.append(model.eval())
    plain = backbone(args)
    tasks = list(paths)
    parts = [(ids == t).nonzero().flatten() for t in range(len(tasks))]
    xs = [x[rows] for rows in parts]

    def infer_multi(model: MultiTaskModel):
        def run() -> list[torch.Tensor]:
            with torch.inference_mode():
                out = model(x, ids)
            return [out.logits[t] for t in tasks]

        return run

    def infer_separate() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model(xt) for model, xt in zip(separate, xs)]

    def infer_plain() -> None:
        with torch.inference_mode():
            plain(x)

    def infer_plain_chunks() -> None:
        with torch.inference_mode():
            for xt in xs:
                plain(xt)

    fns = {
        PLAIN: infer_plain,
        PLAIN_CHUNKS: infer_plain_chunks,
        **{label: infer_multi(multi[label]) for label in FULL},
        SEPARATE: infer_separate,
    }
    print(f"[{task_set}] timing {len(fns)} configurations", file=sys.stderr, flush=True)
    outputs = {label: fn() for label, fn in fns.items()}  # the warm-up round, and the check
    diffs = {
        label: max((got - want).abs().max().item() for got, want in zip(outputs[label], outputs[SEPARATE]))
        for label in FULL
    }
    times = C.time_interleaved(fns, args.repeats, device, clock=clock)
    rows = []
    for label in fns:
        seconds = C.median(times[label])
        rows.append(
            {
                "task_set": task_set,
                "configuration": label,
                "ms": 1e3 * seconds,
                "img_s": x.shape[0] / seconds,
                "x_plain": C.median([t / tp for t, tp in zip(times[label], times[PLAIN])]),
                "vs_separate": C.median([ts / t for t, ts in zip(times[label], times[SEPARATE])]),
                "max_abs_diff": diffs.get(label),
            }
        )
    memory = {
        "task_set": task_set,
        "backbone_mb": nbytes(plain) / 2**20,
        "multi_mb": nbytes(multi["multi-task, grouped"]) / 2**20,
        "gather_mb": nbytes(multi["multi-task, gather"]) / 2**20,
        "copies_mb": nbytes(*separate) / 2**20,
        "delta_mb": delta_bytes / 2**20,
    }
    memory["ratio"] = memory["multi_mb"] / memory["copies_mb"]
    layers = time_layers(args, task_set, multi, x, ids, clock)
    methods = [f"{m} {o} ({c} classes)" for m, o, c in specs]
    return {"rows": rows, "memory": memory, "layers": layers, "methods": methods}


def time_layers(
    args, task_set: str, multi: dict[str, MultiTaskModel], x: torch.Tensor, ids: torch.Tensor, clock: str
) -> list[dict[str, Any]]:
    """Each selection on single layers of block 0 (the first block's qkv, and its MLP where adapted), against
    the frozen layer, in many short interleaved rounds: the per-sample cost without the rest of the model.

    The layers' inputs are captured from one forward of the mixed batch; each call then runs with the routing
    of that batch set on the model (an internal of :mod:`vpeft.multitask`, read here for the measurement only).
    """
    device = torch.device("cpu")
    grouped = multi["multi-task, grouped"]
    names = [
        n
        for n in ("blocks.0.attn.qkv", "blocks.0.mlp")
        if isinstance(grouped.backbone.get_submodule(n), MultiTaskLayer)
    ]
    captured: dict[str, tuple] = {}
    hooks = [
        grouped.backbone.get_submodule(n).register_forward_pre_hook(
            lambda m, a, kw, n=n: captured.setdefault(n, (a, kw)), with_kwargs=True
        )
        for n in names
    ]
    with torch.inference_mode():
        grouped(x, ids)
    for h in hooks:
        h.remove()
    order = torch.argsort(ids, stable=True)
    route = _Route(torch.bincount(ids, minlength=len(grouped.tasks)).tolist(), ids[order])

    def call(model: MultiTaskModel, routed: bool, layer: nn.Module, a: tuple, kw: dict):
        def run() -> None:
            model._router.route = route if routed else None
            try:
                with torch.inference_mode():
                    layer(*a, **kw)
            finally:
                model._router.route = None

        return run

    rows = []
    for name in names:
        a, kw = captured[name]
        layer = grouped.backbone.get_submodule(name)
        adapted = sorted({int(t) for m in layer.modules() if isinstance(m, MultiTaskLayer) for t in m.parts})

        fns = {"frozen": call(grouped, False, layer, a, kw)}
        fns.update({label: call(m, True, m.backbone.get_submodule(name), a, kw) for label, m in multi.items()})
        print(f"[{task_set}] timing layer {name}", file=sys.stderr, flush=True)
        C.time_interleaved(fns, 1, device, progress=False)
        times = C.time_interleaved(fns, args.layer_rounds, device, progress=False, clock=clock)
        row = {
            "task_set": task_set,
            "layer": name,
            "tasks": ", ".join(f"task{t}" for t in adapted),
            "frozen_ms": 1e3 * C.median(times["frozen"]),
        }
        for label in multi:
            row[label] = C.median([t / tf for t, tf in zip(times[label], times["frozen"])])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer-rounds", type=int, default=40, help="rounds of the single-layer comparison")
    p.add_argument("--task-sets", default="lora,mixed", help=f"comma-separated, from {', '.join(TASK_SETS)}")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads; 0 = torch's default")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny ViT, batch 8, 2 repeats, 3 layer rounds (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.layer_rounds = 8, min(args.repeats, 2), min(args.layer_rounds, 3)
    task_sets = args.task_sets.split(",")
    unknown = [t for t in task_sets if t not in TASK_SETS]
    if unknown:
        p.error(f"unknown task set(s) {unknown}; choose from {', '.join(TASK_SETS)}")
    logging.getLogger("vpeft").setLevel(logging.WARNING)
    threads = C.set_threads(args.threads)
    device = torch.device("cpu")
    clock = C.pick_clock(device, threads)
    size = C.QUICK_VIT["img_size"] if args.quick else args.size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(args.batch) % args.tasks  # interleaved: every task's samples are spread over the batch

    results = {t: run_task_set(args, t, x, ids, clock) for t in task_sets}
    desc = f"{C.QUICK_MODEL} (tiny, --quick)" if args.quick else args.model
    print(
        C.header(
            f"Many tasks on one backbone: {desc}, {args.tasks} tasks, mixed batch of {args.batch} "
            f"({args.batch // args.tasks} per task), {size} px, fp32",
            device,
            threads,
            f", {args.repeats} rounds (median of per-round ratios)",
            clock,
        )
    )
    for task_set, res in results.items():
        print(f"\n## Task set `{task_set}`: " + "; ".join(f"task{i}: {m}" for i, m in enumerate(res["methods"])))
        print()
        print(
            C.table(
                res["rows"],
                [
                    ("configuration", "configuration", "s"),
                    ("ms", "ms / batch", ".1f"),
                    ("img_s", "img/s", ".2f"),
                    ("x_plain", "time x plain", ".3f"),
                    ("vs_separate", "throughput x separate", ".3f"),
                    ("max_abs_diff", "max |logits - separate|", ".1e"),
                ],
            )
        )
    print(
        f"\n## Per-sample selection on single layers of block 0 (time x the frozen layer, median of "
        f"{args.layer_rounds} rounds)\n"
    )
    print(
        C.table(
            [r for res in results.values() for r in res["layers"]],
            [
                ("task_set", "task set", "s"),
                ("layer", "layer", "s"),
                ("tasks", "adapted by", "s"),
                ("frozen_ms", "frozen ms", ".1f"),
                *[(label, label.removeprefix("multi-task, "), ".3f") for label in MULTI],
            ],
        )
    )
    print("\n## Memory (distinct parameter and buffer bytes held)\n")
    print(
        C.table(
            [r["memory"] for r in results.values()],
            [
                ("task_set", "task set", "s"),
                ("backbone_mb", "one backbone MB", ".1f"),
                ("multi_mb", "multi-task model MB", ".1f"),
                ("gather_mb", "with gather stacks MB", ".1f"),
                ("copies_mb", f"{args.tasks} full copies MB", ".1f"),
                ("delta_mb", "the deltas MB", ".2f"),
                ("ratio", "multi-task / copies", ".3f"),
            ],
        )
    )
    summary = ", ".join(
        f"{t}: {r['vs_separate']:.3f}x"
        for t, res in results.items()
        for r in res["rows"]
        if r["configuration"] == "multi-task, grouped"
    )
    print(f"\nmulti-task (grouped) throughput vs {args.tasks} separate models: {summary}")
    rows = [r for res in results.values() for r in [*res["rows"], *res["layers"], res["memory"]]]
    C.write_json(args.json, {"args": vars(args), "threads": threads, "clock": clock, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
