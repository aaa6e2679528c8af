"""The leaderboard of a results folder: Markdown, and a self-contained HTML page with sortable tables and plots.

The score is the test primary metric of each task (top-1 for classification, mIoU for segmentation, COCO mAP for
detection, with its AP50 / AP75 / size-range APs in a table of their own) of the final
run of each (method, task, seed). Per task: mean +- std over seeds.
Aggregates (group means, the mean over tasks and the mean of the group means) are computed per seed over the
seeds that finished every task, then given as mean +- std over those seeds; a method missing a task for every
seed gets no aggregate (shown as ``-``), never a mean over a subset of tasks.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpeft.bench.definition import GROUPS
from vpeft.bench.labels import readable_labels
from vpeft.bench.records import load_records, run_dir, write_text_atomic
from vpeft.errors import DataError

__all__ = ["Leaderboard", "build_leaderboard", "current_records", "render_html", "render_markdown", "write_report"]

_AGG_COLUMNS = ("mean_tasks", "mean_groups")


@dataclass
class Stat:
    """Mean and sample standard deviation of a list of values (std ``None`` for fewer than two)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        if self.mean is None:
            return "-"
        s = f"{scale * self.mean:.{digits}f}"
        return s + (f" ± {scale * self.std:.{digits}f}" if self.std is not None else "")


@dataclass
class MethodRow:
    label: str
    method_name: str
    cells: dict[str, Stat] = field(default_factory=dict)  # task -> top-1 over seeds
    groups: dict[str, Stat] = field(default_factory=dict)  # group -> per-seed group mean
    mean_tasks: Stat = field(default_factory=lambda: Stat([]))
    mean_groups: Stat = field(default_factory=lambda: Stat([]))
    complete_seeds: list[int] = field(default_factory=list)
    cost: dict[str, float | None] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)  # how the recipe was chosen: fixed / grid / tune
    title: str = ""  # the readable name shown in the tables (vpeft.bench.labels), unique over the rows
    decoder: str | None = None  # the dense decoder its runs used ("linear / fpn" if tasks differ), None: none

    def __post_init__(self) -> None:
        self.title = self.title or self.label


@dataclass
class Leaderboard:
    title: str
    tasks: list[tuple[str, str]]  # (task, group), grouped in GROUPS order
    groups: list[str]
    rows: list[MethodRow]
    failures: list[dict[str, Any]]
    meta: dict[str, Any]


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(vals) if vals else None


def _order(records: Sequence[Mapping[str, Any]], definition: Mapping[str, Any] | None):
    """Task (with group) and method order: the definition's if known, else first appearance."""
    tasks: dict[str, str] = {}
    methods: dict[str, str] = {}
    if definition:
        tasks.update({t["name"]: t["group"] for t in definition.get("tasks", [])})
        methods.update({m["label"]: m["name"] for m in definition.get("methods", [])})
    for r in records:
        tasks.setdefault(r["task"], r.get("group", "other"))
        methods.setdefault(r["method"], r.get("method_name", r["method"]))
    present_tasks = {r["task"] for r in records}
    present_methods = {r["method"] for r in records}
    rank = {g: i for i, g in enumerate(GROUPS)}
    ordered = sorted(
        ((t, g) for t, g in tasks.items() if t in present_tasks), key=lambda tg: rank.get(tg[1], len(GROUPS))
    )
    return ordered, [(m, n) for m, n in methods.items() if m in present_methods]


def build_leaderboard(records: Sequence[Mapping[str, Any]], definition: Mapping[str, Any] | None = None) -> Leaderboard:
    """Aggregate result records (see the module docstring for the statistics)."""
    ok = [r for r in records if r.get("status") == "ok"]
    failures = [r for r in records if r.get("status") != "ok"]
    tasks, methods = _order(ok, definition)
    groups = list(dict.fromkeys(g for _, g in tasks))
    rows = [_method_row(label, name, [r for r in ok if r["method"] == label], tasks, groups) for label, name in methods]
    _name_rows(rows, ok)
    rows.sort(key=lambda row: -(row.mean_groups.mean if row.mean_groups.mean is not None else -1.0))
    meta = {}
    if definition:
        meta = {k: definition.get(k) for k in ("name", "backbone", "img_size", "description", "train")}
    meta["seeds"] = sorted({r["seed"] for r in ok})  # the seeds that ran, not all the definition names
    if ok:
        env = ok[0].get("env", {})
        meta["env"] = {k: env.get(k) for k in ("vpeft", "torch", "timm", "device", "gpu", "cpu_count")}
        commits = {_commit((r.get("env") or {}).get("git") or {}) for r in ok}
        meta["env"]["commits"] = sorted(commits)
    meta["metric"] = metric_name(ok)
    meta["task_kinds"] = sorted({str(r.get("task_kind") or "classification") for r in ok})
    meta["per_class"] = _per_class(ok, tasks, methods)
    meta["box_ap"] = _box_ap(ok, tasks, methods)
    meta["base_to_novel"] = _base_to_novel(ok, tasks, methods)
    meta["transfer"] = _transfer(ok, methods)
    title = f"vpeft leaderboard: {meta.get('name') or 'results'}"
    return Leaderboard(title, tasks, groups, rows, failures, meta)


#: the dense head a task kind uses when its options name none (SegmentationTask's and DetectionTask's defaults)
_DEFAULT_HEADS = {"segmentation": "linear", "detection": "fcos"}


def record_decoder(record: Mapping[str, Any]) -> str | None:
    """The decoder (segmentation) or detector (detection) a run used: the record's own field, else its task
    options, else the task kind's default."""
    for key in ("decoder", "detector"):
        if record.get(key):
            return str(record[key])
    options = (record.get("spec") or {}).get("task_options") or {}
    for key in ("decoder", "detector"):
        if options.get(key):
            return str(options[key])
    return _DEFAULT_HEADS.get(record.get("task_kind") or "")


def _name_rows(rows: Sequence[MethodRow], ok: Sequence[Mapping[str, Any]]) -> None:
    """Set each row's decoder and readable, unique title (:func:`vpeft.bench.labels.readable_labels`)."""
    described = []
    for row in rows:
        recs = [r for r in ok if r["method"] == row.label]
        decoders = list(dict.fromkeys(d for d in map(record_decoder, recs) if d))
        row.decoder = " / ".join(decoders) or None
        spec = next((r["spec"] for r in recs if isinstance(r.get("spec"), Mapping)), None)
        described.append({
            "label": row.label, "method_name": row.method_name, "settings": spec.get("settings") if spec else None,
            "dense": bool(decoders or row.cost.get("decoder_params")), "decoder": row.decoder,
        })  # fmt: skip
    for row, title in zip(rows, readable_labels(described)):
        row.title = title


def _base_to_novel(ok: Sequence[Mapping[str, Any]], tasks, methods) -> dict[str, dict[str, list[float | None]]]:
    """Per method, per base-to-novel task: mean base, novel and HM accuracy over seeds."""
    b2n_tasks = [t for t, _ in tasks if any(r["task"] == t and r.get("protocol") == "base-to-novel" for r in ok)]
    out: dict[str, dict[str, list[float | None]]] = {}
    for label, _ in methods:
        row = {}
        for task in b2n_tasks:
            recs = [r for r in ok if r["method"] == label and r["task"] == task and r.get("protocol")]
            row[task] = [_mean([r[k] for r in recs]) for k in ("base", "novel", "hm")]
        if any(v[2] is not None for v in row.values()):
            out[label] = row
    return out


def _transfer(ok: Sequence[Mapping[str, Any]], methods) -> dict[str, dict[str, float | None]]:
    """Cross-dataset transfer: per method, ``"source -> target"``: mean zero-shot top-1 over seeds."""
    out: dict[str, dict[str, float | None]] = {}
    for label, _ in methods:
        pairs: dict[str, list[float]] = {}
        for r in ok:
            if r["method"] == label:
                for target, m in (r.get("transfer") or {}).items():
                    pairs.setdefault(f"{r['task']} -> {target}", []).append(m["top1"])
        if pairs:
            out[label] = {k: _mean(v) for k, v in pairs.items()}
    return out


def _transfer_table(lb: Leaderboard):
    table = lb.meta.get("transfer") or {}
    cols = list(dict.fromkeys(k for per in table.values() for k in per))
    head = _method_head(lb) + [(c, c) for c in cols]
    rows = [
        _method_cells(lb, m) + [(_num(per.get(c), ".1f", 100), per.get(c)) for c in cols] for m, per in table.items()
    ]
    return head, rows


def _b2n_table(lb: Leaderboard):
    table = lb.meta.get("base_to_novel") or {}
    tasks = list(next(iter(table.values()), {}))
    head = _method_head(lb) + [(f"{t}:{k}", f"{t} {k}") for t in tasks for k in ("base", "novel", "HM")]
    rows = [
        _method_cells(lb, m) + [(_num(v, ".1f", 100), v) for t in tasks for v in per[t]] for m, per in table.items()
    ]
    return head, rows


#: per-class test metrics a record may hold (its ``test_metrics`` key) and their display names
PER_CLASS_METRICS = {"iou": "IoU", "ap": "AP"}


def _per_class(ok: Sequence[Mapping[str, Any]], tasks, methods) -> dict[str, dict[str, Any]]:
    """Per task with per-class scores (segmentation IoU, detection AP@[.5:.95]):
    ``{task: {"metric": "IoU", "classes": [...], "rows": {method: [mean]}}}`` (a class without a value: None)."""
    out: dict[str, dict[str, Any]] = {}
    for task, _ in tasks:
        of_task = [r for r in ok if r["task"] == task]
        key = next((k for k in PER_CLASS_METRICS if any((r.get("test_metrics") or {}).get(k) for r in of_task)), None)
        if key is None:
            continue
        recs = [r for r in of_task if (r.get("test_metrics") or {}).get(key)]
        n = len(recs[0]["test_metrics"][key])
        classes = recs[0].get("class_names") or [f"class {i}" for i in range(n)]
        rows = {}
        for label, _ in methods:
            per = [r["test_metrics"][key] for r in recs if r["method"] == label]
            if per:
                rows[label] = [_mean([p[i] for p in per]) for i in range(n)]
        out[task] = {"metric": PER_CLASS_METRICS[key], "classes": list(classes), "rows": rows}
    return out


#: the COCO box metrics shown beside a detection task's mAP (``test_metrics`` key, column title)
BOX_METRICS = (
    ("map", "mAP"), ("ap50", "AP50"), ("ap75", "AP75"), ("ap_small", "AP small"), ("ap_medium", "AP medium"),
    ("ap_large", "AP large"),
)  # fmt: skip


def _box_ap(ok: Sequence[Mapping[str, Any]], tasks, methods) -> dict[str, dict[str, list[float | None]]]:
    """Per detection task (records with COCO box metrics), per method: the mean over seeds of each of
    :data:`BOX_METRICS` (None where COCO has no value, e.g. no large box in the split)."""
    out: dict[str, dict[str, list[float | None]]] = {}
    for task, _ in tasks:
        recs = [r for r in ok if r["task"] == task and "ap50" in (r.get("test_metrics") or {})]
        rows = {}
        for label, _ in methods:
            per = [r["test_metrics"] for r in recs if r["method"] == label]
            if per:
                rows[label] = [_mean([m.get(k) for m in per]) for k, _ in BOX_METRICS]
        if rows:
            out[task] = rows
    return out


def _score(record: Mapping[str, Any]) -> float:
    """A record's test score: its task's primary metric (top-1 for classification, mIoU for segmentation ...)."""
    return record["score"] if "score" in record else record["top1"]


METRIC_NAMES = {"top1": "top-1", "miou": "mIoU", "map": "mAP", "hm": "HM (base-to-novel)"}


def metric_name(records: Sequence[Mapping[str, Any]]) -> str:
    """The display name of the records' primary metric (``"top-1 / mIoU"`` for a mix)."""
    keys = [r.get("primary_metric", "top1") for r in records]
    names = dict.fromkeys(METRIC_NAMES.get(k, k) for k in keys)
    return " / ".join(names) or "top-1"


def _method_row(label: str, name: str, recs: Sequence[Mapping[str, Any]], tasks, groups) -> MethodRow:
    row = MethodRow(label, name)
    by_task_seed = {(r["task"], r["seed"]): r for r in recs}
    seeds = sorted({r["seed"] for r in recs})
    for task, _ in tasks:
        row.cells[task] = Stat([_score(by_task_seed[(task, s)]) for s in seeds if (task, s) in by_task_seed])
    row.complete_seeds = [s for s in seeds if all((t, s) in by_task_seed for t, _ in tasks)]
    per_group: dict[str, list[float]] = {g: [] for g in groups}
    means, group_means = [], []
    for s in row.complete_seeds:
        gm = {g: statistics.fmean(_score(by_task_seed[(t, s)]) for t, tg in tasks if tg == g) for g in groups}
        for g, v in gm.items():
            per_group[g].append(v)
        means.append(statistics.fmean(_score(by_task_seed[(t, s)]) for t, _ in tasks))
        group_means.append(statistics.fmean(gm.values()))
    row.groups = {g: Stat(v) for g, v in per_group.items()}
    row.mean_tasks, row.mean_groups = Stat(means), Stat(group_means)
    lat = [r.get("latency") or {} for r in recs]
    row.cost = {
        "trainable_params": _mean([r["trainable_params"] for r in recs]),
        "method_params": _mean([r["method_params"] for r in recs]),
        "decoder_params": _mean([r.get("decoder_params") or 0 for r in recs]),
        "total_params": _mean([r["total_params"] for r in recs]),
        "delta_bytes": _mean([r.get("delta_bytes") for r in recs]),
        "peak_train_mem_bytes": _mean([r.get("peak_train_mem_bytes") for r in recs]),
        "train_images_per_s": _mean([r.get("train_images_per_s") for r in recs]),
        "train_time_s": _mean([r.get("train_time_s") for r in recs]),
        "latency_unmerged_ms": _mean([x.get("unmerged_ms") for x in lat]),
        "latency_merged_ms": _mean([x.get("merged_ms") for x in lat]),
        "latency_batch": lat[0].get("batch_size") if lat else None,
        "sample_unit": _sample_unit(lat),
        "runs": len(recs),
    }
    row.selection = _selection_summary([r.get("selection") for r in recs])
    return row


def _sample_unit(latencies: Sequence[Mapping[str, Any]]) -> str:
    """What the runs' samples are ("images", "clips"; "samples" for a mix): records without the field are images."""
    units = {x.get("batch_of") or "images" for x in latencies} or {"images"}
    return units.pop() if len(units) == 1 else "samples"


def _selection_summary(selections: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """How a method's recipes were chosen over its runs: fixed, a grid of N settings, or N Optuna trials."""
    sels = [s for s in selections if s]
    if not sels:
        return {"kind": "fixed", "candidates": None, "cpu_s": None, "val": None, "pruned": None}
    kind = "tune" if any(s.get("kind") == "tune" for s in sels) else "grid"
    pruned = [int((s.get("trials") or {}).get("pruned", 0)) for s in sels] if kind == "tune" else None
    return {
        "kind": kind,
        "candidates": _mean([s.get("candidates") or len(s.get("results") or []) for s in sels]),
        "cpu_s": sum(float(s["cpu_s"]) for s in sels) if all(s.get("cpu_s") is not None for s in sels) else None,
        "val": _mean([s.get("best_val") for s in sels]),
        "pruned": _mean(pruned) if pruned is not None else None,
    }


def _selection_table(lb: Leaderboard) -> tuple[list[tuple[str, str]], list[list[tuple[str, float | str | None]]]]:
    """Fixed, grid-selected and tuned recipes side by side, with what choosing cost (trials, CPU time)."""
    head = _method_head(lb) + [
        ("recipe", "recipe"),
        ("trials", "settings / trials per run"),
        ("val", "chosen val (%)"),
        ("test", "test, mean over tasks (%)"),
        ("cpu", "selection CPU (s, all runs)"),
    ]
    rows = []
    for r in lb.rows:
        sel = r.selection
        label = {"fixed": "fixed", "grid": "grid", "tune": "tuned (Optuna)"}[sel["kind"]]
        n = sel["candidates"]
        trials = "-" if n is None else f"{n:.0f}" + (f" ({sel['pruned']:.1f} pruned)" if sel["pruned"] else "")
        rows.append([*_method_cells(lb, r), (label, label), (trials, n), (_num(sel["val"], ".1f", 100), sel["val"]),
                     (r.mean_tasks.fmt(), r.mean_tasks.mean), (_num(sel["cpu_s"], ",.1f"), sel["cpu_s"])])  # fmt: skip
    return head, rows


def _has_selection(lb: Leaderboard) -> bool:
    return any(r.selection.get("kind") != "fixed" for r in lb.rows)


# ---- formatting -----------------------------------------------------------------------------------------------------
def _num(v: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def _decoders_differ(lb: Leaderboard) -> bool:
    return len({r.decoder for r in lb.rows}) > 1


def _row(lb: Leaderboard, row: MethodRow | str) -> MethodRow:
    return row if isinstance(row, MethodRow) else next(r for r in lb.rows if r.label == row)


def _head_word(lb: Leaderboard) -> str:
    """What the dense part outside the backbone is called in the column titles: "detector" when every run is a
    detection run, else "decoder"."""
    return "detector" if lb.meta.get("task_kinds") == ["detection"] else "decoder"


def _method_head(lb: Leaderboard) -> list[tuple[str, str]]:
    """The columns naming a row: its readable method name, and its decoder where the rows differ in decoder."""
    return [("method", "method")] + ([("decoder", _head_word(lb))] if _decoders_differ(lb) else [])


def _method_cells(lb: Leaderboard, row: MethodRow | str) -> list[tuple[str, float | str | None]]:
    row = _row(lb, row)
    cells: list[tuple[str, float | str | None]] = [(row.title, row.title)]
    return cells + ([(row.decoder or "-", row.decoder)] if _decoders_differ(lb) else [])


def _share(lb: Leaderboard) -> tuple[str, str, Any]:
    """The parameter-share column: ``(title, format, row -> percent or None)``.

    With a ``full`` fine-tuning row: a row's trainable parameters in % of full fine-tuning's (the full row with the
    same decoder where there is one); else in % of all the model's parameters.
    """
    fulls = [r for r in lb.rows if r.method_name == "full" and r.cost.get("trainable_params")]
    if not fulls:

        def of_model(r: MethodRow) -> float | None:
            c = r.cost
            return 100 * c["trainable_params"] / c["total_params"] if c["total_params"] else None

        return "% of model", ".3f", of_model

    def of_full(r: MethodRow) -> float | None:
        ref = next((f for f in fulls if f.decoder == r.decoder), fulls[0])
        t = r.cost["trainable_params"]
        return None if t is None else 100 * t / ref.cost["trainable_params"]

    return "% of full's trainable", ".2f", of_full


def _has_decoders(lb: Leaderboard) -> bool:
    return any(r.cost.get("decoder_params") for r in lb.rows)


def _param_split(lb: Leaderboard, r: MethodRow) -> list[tuple[str, float | str | None]]:
    """Method and decoder parameters (with decoders), else trainable (incl. the head) and method parameters."""
    c = r.cost
    keys = ("method_params", "decoder_params") if _has_decoders(lb) else ("trainable_params", "method_params")
    return [(_num(c[k], ",.0f"), c[k]) for k in keys]


def _param_split_head(lb: Leaderboard) -> list[tuple[str, str]]:
    if _has_decoders(lb):
        return [("method_p", "method params"), ("decoder_p", f"{_head_word(lb)} params")]
    return [("trainable", "trainable params"), ("method_p", "method params")]


def _single_task_table(lb: Leaderboard):
    """One task: its score beside what it cost in parameters and memory (the group and task means would repeat it)."""
    (task, _), (share_title, share_fmt, share) = lb.tasks[0], _share(lb)
    seeds = len({len(r.complete_seeds) for r in lb.rows}) > 1
    head = [*_method_head(lb), (f"task:{task}", f"test {lb.meta.get('metric', 'top-1')} (%)")]
    head += [*_param_split_head(lb), ("pct", share_title), ("mem", "peak train mem (MiB)")]
    head += [("seeds", "seeds")] if seeds else []
    rows = []
    for r in lb.rows:
        mem, pct = r.cost["peak_train_mem_bytes"], share(r)
        cells = [*_method_cells(lb, r), (r.cells[task].fmt(), r.cells[task].mean), *_param_split(lb, r)]
        cells += [(_num(pct, share_fmt), pct), (_num(mem, ",.0f", 1 / 2**20), mem)]
        cells += [(str(len(r.complete_seeds)), len(r.complete_seeds))] if seeds else []
        rows.append(cells)
    return head, rows


def _accuracy_table(lb: Leaderboard) -> tuple[list[tuple[str, str]], list[list[tuple[str, float | str | None]]]]:
    """Header ``(key, title)`` pairs and rows of ``(text, sort value)`` cells (one task: :func:`_single_task_table`)."""
    if len(lb.tasks) == 1:
        return _single_task_table(lb)
    head = [*_method_head(lb), ("params", "params (M)")]
    head += [(f"task:{t}", t) for t, _ in lb.tasks]
    head += [(f"group:{g}", f"{g.capitalize()} mean") for g in lb.groups]
    head += [("mean_tasks", "mean (tasks)"), ("mean_groups", "mean (groups)"), ("seeds", "seeds")]
    rows = []
    for r in lb.rows:
        p = r.cost["trainable_params"]
        cells = [*_method_cells(lb, r), (_num(p, ".3f", 1e-6), p)]
        cells += [(r.cells[t].fmt(), r.cells[t].mean) for t, _ in lb.tasks]
        cells += [(r.groups[g].fmt(), r.groups[g].mean) for g in lb.groups]
        cells += [(r.mean_tasks.fmt(), r.mean_tasks.mean), (r.mean_groups.fmt(), r.mean_groups.mean)]
        cells.append((str(len(r.complete_seeds)), len(r.complete_seeds)))
        rows.append(cells)
    return head, rows


_UNIT_SHORT = {"images": "img"}


def _table_unit(lb: Leaderboard) -> str:
    units = {r.cost.get("sample_unit") or "images" for r in lb.rows} or {"images"}
    return units.pop() if len(units) == 1 else "samples"


def _cost_table(lb: Leaderboard) -> tuple[list[tuple[str, str]], list[list[tuple[str, float | str | None]]]]:
    decoders = _has_decoders(lb)
    share_title, share_fmt, share = _share(lb)
    head = [*_method_head(lb), ("trainable", "trainable params")]
    if decoders:
        head += [("method_p", "method params"), ("decoder_p", f"{_head_word(lb)} params")]
    head += [
        ("pct", share_title),
        ("delta", "delta (KiB)"),
        ("mem", "peak train mem (MiB)"),
        ("ips", f"train {_UNIT_SHORT.get(_table_unit(lb), _table_unit(lb))}/s"),
        ("time", "train time (s)"),
        ("lat_u", "latency unmerged (ms)"),
        ("lat_m", "latency merged (ms)"),
    ]
    rows = []
    for r in lb.rows:
        c = r.cost
        pct = share(r)
        rows.append(
            [
                *_method_cells(lb, r),
                (_num(c["trainable_params"], ",.0f"), c["trainable_params"]),
                *(_param_split(lb, r) if decoders else []),
                (_num(pct, share_fmt), pct),
                (_num(c["delta_bytes"], ",.1f", 1 / 1024), c["delta_bytes"]),
                (_num(c["peak_train_mem_bytes"], ",.0f", 1 / 2**20), c["peak_train_mem_bytes"]),
                (_num(c["train_images_per_s"], ".1f"), c["train_images_per_s"]),
                (_num(c["train_time_s"], ".1f"), c["train_time_s"]),
                (_num(c["latency_unmerged_ms"], ".1f"), c["latency_unmerged_ms"]),
                (_num(c["latency_merged_ms"], ".1f"), c["latency_merged_ms"]),
            ]
        )
    return head, rows


def _cost_title(lb: Leaderboard) -> str:
    batch = next((r.cost["latency_batch"] for r in lb.rows if r.cost["latency_batch"]), None)
    lat = f"; latency: ms per batch of {batch} {_table_unit(lb)}" if batch else ""
    return f"Cost (final runs, mean over tasks and seeds{lat})"


_TEXT_COLUMNS = ("method", "decoder", "recipe")


def _md_table(head, rows) -> str:
    lines = ["| " + " | ".join(title for _, title in head) + " |"]
    lines.append("|" + "|".join("---" if key in _TEXT_COLUMNS else "---:" for key, _ in head) + "|")
    lines += ["| " + " | ".join(text for text, _ in row) + " |" for row in rows]
    return "\n".join(lines)


def _commit(git: Mapping[str, Any]) -> str:
    return (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")


def _describe(lb: Leaderboard) -> str:
    m = lb.meta
    bits = []
    if m.get("backbone"):
        bits.append(f"backbone `{m['backbone']}`" + (f" at {m['img_size']} px" if m.get("img_size") else ""))
    if len(lb.tasks) == 1:
        bits.append(f"task `{lb.tasks[0][0]}`")
    decoders = {r.decoder for r in lb.rows}
    if len(decoders) == 1 and None not in decoders:
        bits.append(f"{_head_word(lb)} `{decoders.pop()}`")
    env = m.get("env") or {}
    if m.get("seeds"):
        bits.append(f"seeds {', '.join(map(str, m['seeds']))}")
    if m.get("train"):
        bits.append("recipe " + ", ".join(f"{k}={v}" for k, v in m["train"].items()))
    if env:
        bits.append(f"vpeft {env.get('vpeft')}, torch {env.get('torch')}, device {env.get('gpu') or env.get('device')}")
        commits = env.get("commits") or []
        more = f" and {len(commits) - 3} more" if len(commits) > 3 else ""
        bits.append(("commit " if len(commits) == 1 else "commits ") + ", ".join(commits[:3]) + more)
    if m.get("stale"):
        bits.append(f"{m['stale']} stale record(s) made by another definition of the benchmark skipped")
    return "; ".join(bits)


_PROTOCOL = (
    "Test {metric} (%) of the final run (trained on train+val -- VTAB-1k: train800val200 -- with the setting chosen "
    "on val, test read once), mean ± std over seeds. "
)
_PROTOCOL_TASKS = (
    "Group means, the mean over tasks and the mean of group means are computed per seed over the seeds that "
    "finished every task. params: trainable parameters incl. the head or decoder, mean over tasks."
)
_SHARE_NOTES = {
    "% of full's trainable": "% of full's trainable: the row's trainable parameters (method + head or decoder) in % "
    "of full fine-tuning's (with the same decoder where one ran).",
    "% of model": "% of model: the row's trainable parameters (method + head or decoder) in % of all the model's.",
}


def _protocol(lb: Leaderboard) -> str:
    """The paragraph above the first table: how the scores were obtained and what its columns mean."""
    text = _PROTOCOL.format(metric=lb.meta.get("metric", "top-1"))
    return text + (_SHARE_NOTES[_share(lb)[0]] if len(lb.tasks) == 1 else _PROTOCOL_TASKS)


_SELECTION = "Recipe selection: fixed, grid and tuned recipes at their selection cost"


def _per_class_table(lb: Leaderboard, table: Mapping[str, Any]):
    head = _method_head(lb) + [(f"c{i}", c) for i, c in enumerate(table["classes"])]
    per = table["rows"]  # in the leaderboard's order
    rows = [_method_cells(lb, r) + [(_num(v, ".1f", 100), v) for v in per[r.label]] for r in lb.rows if r.label in per]
    return head, rows


def _per_class_title(task: str, table: Mapping[str, Any]) -> str:
    return f"Per-class {table.get('metric', 'IoU')} (%) on {task}"


def _per_class_md(lb: Leaderboard) -> list[str]:
    out = []
    for task, table in (lb.meta.get("per_class") or {}).items():
        head, rows = _per_class_table(lb, table)
        out += [f"## {_per_class_title(task, table)}", "", _md_table(head, rows), ""]
    return out


_BOX_NOTE = (
    "COCO box AP (pycocotools) of the final run on the whole test split, mean over seeds: mAP = AP@[.50:.95], "
    "AP50 / AP75 at IoU 0.5 / 0.75, small / medium / large: boxes under 32², 32²-96², over 96² stored pixels."
)


def _box_table(lb: Leaderboard, rows_of: Mapping[str, list[float | None]]):
    head = _method_head(lb) + [(k, title) for k, title in BOX_METRICS]
    rows = [
        _method_cells(lb, r) + [(_num(v, ".1f", 100), v) for v in rows_of[r.label]]
        for r in lb.rows
        if r.label in rows_of
    ]
    return head, rows


def _box_md(lb: Leaderboard) -> list[str]:
    out = []
    for task, rows_of in (lb.meta.get("box_ap") or {}).items():
        out += [f"## Box AP (%) on {task}", "", _BOX_NOTE, "", _md_table(*_box_table(lb, rows_of)), ""]
    return out


def _box_html(lb: Leaderboard) -> list[str]:
    out = []
    for i, (task, rows_of) in enumerate((lb.meta.get("box_ap") or {}).items()):
        out += [f"<h2>Box AP (%) on {html.escape(task)}</h2>", f'<p class="note">{html.escape(_BOX_NOTE)}</p>']
        out.append(_html_table(*_box_table(lb, rows_of), f"box-ap-{i}"))
    return out


def render_markdown(lb: Leaderboard) -> str:
    """The leaderboard as Markdown (accuracy table, cost table, failures)."""
    out = [f"# {lb.title}", ""]
    if _describe(lb):
        out += [_describe(lb), ""]
    out += [_protocol(lb), "", _md_table(*_accuracy_table(lb)), ""]
    out += [f"## {_cost_title(lb)}", "", _md_table(*_cost_table(lb)), ""]
    if _has_selection(lb):
        out += [f"## {_SELECTION}", "", _md_table(*_selection_table(lb)), "", *_plot_links_md(lb)]
    out += _box_md(lb)
    out += _per_class_md(lb)
    if lb.meta.get("base_to_novel"):
        out += ["## Base-to-novel accuracy (%)", "", "HM = 2BN/(B+N), mean over seeds.", ""]
        out += [_md_table(*_b2n_table(lb)), ""]
    if lb.meta.get("transfer"):
        out += ["## Cross-dataset transfer: zero-shot top-1 (%) on other tasks", ""]
        out += [_md_table(*_transfer_table(lb)), ""]
    if lb.failures:
        out += [f"## Failed runs ({len(lb.failures)})", ""]
        out += [f"- `{f.get('run_id')}`: {f.get('error')}" for f in lb.failures]
        out.append("")
    return "\n".join(out)


# ---- plots ---------------------------------------------------------------------------------------------------
def _plot_png(lb: Leaderboard, x_key: str, xlabel: str, title: str) -> str | None:
    """A scatter of the mean-over-tasks score against ``cost[x_key]`` (log x), as base64 PNG; None without data."""
    pts = [
        (r.cost[x_key], 100 * r.mean_tasks.mean, 100 * (r.mean_tasks.std or 0.0), _plot_label(lb, r))
        for r in lb.rows
        if r.cost.get(x_key) and r.mean_tasks.mean is not None
    ]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=100)
    try:
        for x, y, e, label in pts:
            ax.errorbar([x], [y], yerr=[e] if e else None, fmt="o", capsize=3)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.margins(x=0.2, y=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"mean {lb.meta.get('metric', 'top-1')} over tasks (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_label(lb: Leaderboard, r: MethodRow) -> str:
    return f"{r.title}, {r.decoder}" if _decoders_differ(lb) and r.decoder else r.title


def _plots(lb: Leaderboard) -> list[tuple[str, str, str | None]]:
    """``(id, caption, base64 png or None)`` for the two plots; None when matplotlib is missing or no data."""
    specs = [
        ("plot-params", "trainable_params", "trainable parameters (log)", "Accuracy vs trainable parameters"),
        ("plot-cost", "train_time_s", "training time of the final run, s (log)", "Accuracy vs training cost"),
    ]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [
            (pid, title + " (matplotlib is not installed: pip install 'vpeft[bench]')", None)
            for pid, *_, title in specs
        ]
    return [(pid, title, _plot_png(lb, key, xlabel, title)) for pid, key, xlabel, title in specs]


# ---- HTML ----------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1b1f24;max-width:1400px}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}p.note{color:#57606a;font-size:.9rem;max-width:70rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:right;white-space:nowrap}
th{background:#f6f8fa;cursor:pointer;user-select:none}th:first-child,td:first-child{text-align:left}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr:nth-child(even) td{background:#fbfcfd}figure{display:inline-block;margin:1rem 1rem 0 0}
figcaption{font-size:.85rem;color:#57606a}
"""

# Click a header to sort its table (numbers: descending first; text: ascending first); click again to flip.
# Empty cells (no value) always sort last.
_JS = """
function vpeftSort(th){
  const table=th.closest('table'), body=table.tBodies[0], col=th.cellIndex, num=th.dataset.type==='num';
  const order=th.getAttribute('aria-sort')==='descending'?'ascending':th.getAttribute('aria-sort')==='ascending'
    ?'descending':(num?'descending':'ascending');
  const key=r=>{const c=r.cells[col];return num?parseFloat(c.dataset.value):c.textContent};
  const rows=Array.from(body.rows).sort((a,b)=>{const x=key(a),y=key(b);
    if(num&&(isNaN(x)||isNaN(y)))return isNaN(x)-isNaN(y);  // cells without a value stay last
    const c=num?x-y:String(x).localeCompare(String(y));return order==='ascending'?c:-c});
  rows.forEach(r=>body.appendChild(r));
  table.querySelectorAll('th').forEach(h=>h.removeAttribute('aria-sort'));th.setAttribute('aria-sort',order);
}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>vpeftSort(th)));
"""


def _html_table(head, rows, table_id: str) -> str:
    e = html.escape
    numeric = [any(isinstance(row[i][1], (int, float)) for row in rows) for i in range(len(head))]
    ths = "".join(
        f'<th data-key="{e(k)}" data-type="{"num" if numeric[i] else "text"}">{e(t)}</th>'
        for i, (k, t) in enumerate(head)
    )
    body = []
    for row in rows:
        tds = []
        for i, (text, value) in enumerate(row):
            v = "" if value is None else (repr(float(value)) if numeric[i] else str(value))
            tds.append(f'<td data-value="{e(v)}">{e(text)}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (
        f'<table id="{table_id}" class="sortable"><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _per_class_html(lb: Leaderboard) -> list[str]:
    out = []
    for i, (task, table) in enumerate((lb.meta.get("per_class") or {}).items()):
        head, rows = _per_class_table(lb, table)
        out += [f"<h2>{html.escape(_per_class_title(task, table))}</h2>", _html_table(head, rows, f"per-class-{i}")]
    return out


def render_html(lb: Leaderboard) -> str:
    """A self-contained HTML page (inline CSS, JS and PNG plots; no external resources)."""
    e = html.escape
    protocol = _protocol(lb)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(lb.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(lb.title)}</h1>",
        f'<p class="note">{e(_describe(lb).replace("`", ""))}</p>' if _describe(lb) else "",
        f'<p class="note">{e(protocol)} Click a column header to sort.</p>',
        _html_table(*_accuracy_table(lb), "accuracy"),
        f"<h2>{e(_cost_title(lb))}</h2>",
        _html_table(*_cost_table(lb), "cost"),
        *(
            [f"<h2>{e(_SELECTION)}</h2>", _html_table(*_selection_table(lb), "selection"), *_plot_links_html(lb)]
            if _has_selection(lb)
            else []
        ),
        *_box_html(lb),
        *_per_class_html(lb),
        *(
            ["<h2>Base-to-novel accuracy (%)</h2>", _html_table(*_b2n_table(lb), "base-to-novel")]
            if lb.meta.get("base_to_novel")
            else []
        ),
        *(
            ["<h2>Cross-dataset transfer (%)</h2>", _html_table(*_transfer_table(lb), "transfer")]
            if lb.meta.get("transfer")
            else []
        ),
        "<h2>Plots</h2>",
    ]
    for pid, caption, png in _plots(lb):
        if png is None:
            parts.append(f'<p class="note" id="{pid}">{e(caption)}: no data to plot.</p>')
        else:
            parts.append(
                f'<figure><img id="{pid}" alt="{e(caption)}" src="data:image/png;base64,{png}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
    if lb.failures:
        parts.append(f"<h2>Failed runs ({len(lb.failures)})</h2><ul>")
        parts += [f"<li><code>{e(str(f.get('run_id')))}</code>: {e(str(f.get('error')))}</li>" for f in lb.failures]
        parts.append("</ul>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(p for p in parts if p)


def current_records(
    records: Sequence[Mapping[str, Any]], definition: Mapping[str, Any] | None
) -> tuple[list[Mapping[str, Any]], int]:
    """``(records of the current definition, number of stale ones skipped)``.

    A record is current when its run's fingerprint equals the one ``definition.json`` lists for that run
    (``run_fingerprints``): a record written under another definition (another recipe, setting, or a run no longer
    in the grid) is never shown as current. A ``definition.json`` without ``run_fingerprints`` (older vpeft) keeps
    every record.
    """
    fingerprints = (definition or {}).get("run_fingerprints")
    if not isinstance(fingerprints, Mapping):
        return list(records), 0
    keep = [r for r in records if fingerprints.get(r.get("run_id")) == r.get("fingerprint") is not None]
    return keep, len(records) - len(keep)


def _tune_plots(records: Sequence[Mapping[str, Any]], results_dir: Path) -> list[tuple[str, list[str]]]:
    """``[(run id, [plot paths relative to the results folder])]`` of the runs whose recipe Optuna chose."""
    out = []
    for r in records:
        sel = r.get("selection") or {}
        if r.get("status") == "ok" and sel.get("kind") == "tune" and sel.get("plots"):
            base = run_dir(Path("."), r["method"], r["task"], r["seed"])
            out.append((str(r.get("run_id")), [(base / p).as_posix() for p in sel["plots"]]))
    return out


def _plot_links_md(lb: Leaderboard) -> list[str]:
    links = lb.meta.get("tune_plots") or []
    lines = [f"- `{rid}`: " + ", ".join(f"[{Path(p).stem}]({p})" for p in paths) for rid, paths in links]
    return ["Optuna plots of the tuned runs:", "", *lines, ""] if lines else []


def _plot_links_html(lb: Leaderboard) -> list[str]:
    e = html.escape
    links = lb.meta.get("tune_plots") or []
    if not links:
        return []
    items = [f"<li><code>{e(rid)}</code>: " + ", ".join(f'<a href="{e(p)}">{e(Path(p).stem)}</a>' for p in paths)
             + "</li>" for rid, paths in links]  # fmt: skip
    return ['<p class="note">Optuna plots of the tuned runs:</p><ul>', *items, "</ul>"]


def write_report(
    results_dir: str | Path, html_path: str | Path | None = None, md_path: str | Path | None = None
) -> tuple[str, Path, Path]:
    """Build the leaderboard of ``results_dir``; write Markdown and HTML (default: beside the results).

    Returns:
        ``(markdown text, markdown path, html path)``.

    Raises:
        DataError: No records in ``results_dir``.
    """
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    if not records:
        raise DataError(f"no bench records under {results_dir / 'runs'} (run `vpeft bench DEFINITION --out DIR` first)")
    definition = None
    if (results_dir / "definition.json").is_file():
        try:
            definition = json.loads((results_dir / "definition.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{results_dir / 'definition.json'} is unreadable ({exc}); re-run `vpeft bench`") from None
        if not isinstance(definition, dict):
            raise DataError(f"{results_dir / 'definition.json'} is not a bench definition; re-run `vpeft bench`")
    records, stale = current_records(records, definition)
    if not records:
        raise DataError(
            f"all {stale} bench records under {results_dir / 'runs'} were made by another definition than the "
            "current definition.json: re-run `vpeft bench` with it"
        )
    lb = build_leaderboard(records, definition)
    lb.meta["stale"] = stale
    lb.meta["tune_plots"] = _tune_plots(records, results_dir)
    md = render_markdown(lb)
    md_path = Path(md_path) if md_path else results_dir / "leaderboard.md"
    html_path = Path(html_path) if html_path else results_dir / "leaderboard.html"
    write_text_atomic(md_path, md)
    write_text_atomic(html_path, render_html(lb))
    return md, md_path, html_path
