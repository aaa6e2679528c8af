"""One benchmark run under the VTAB-1k protocol, and its measurements.

For one (method, task, seed):

1. if the method has a grid, train each setting on ``train`` (train800) and evaluate it on ``val`` (val200);
   the best validation top-1 wins (ties: the first setting in grid order);
2. train the chosen setting on ``trainval`` (train800val200) and evaluate ``test`` exactly once, at the end.

The test split is never touched in step 1, and no checkpoint is ever chosen on it. Both steps call
:func:`vpeft.run.finetune`, the project's one training path. The final run is then measured: peak training memory,
training throughput, stored delta size, and inference latency of the adapted model unmerged and merged.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vpeft.bench.definition import RunSpec
from vpeft.bench.records import environment, write_record
from vpeft.errors import VpeftError
from vpeft.tasks.protocols import Transfer, get_protocol

if TYPE_CHECKING:
    from vpeft.run import RunRequest

__all__ = ["PeakMemory", "ensure_task", "execute_run", "measure_latency", "run_and_record"]

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def ensure_task(spec: RunSpec) -> None:
    """Produce a generated task (digits, moving digits, dSprites) under its root if it is not there yet (atomic,
    idempotent)."""
    if spec.generate is None:
        return
    from vpeft.data import GENERATED_TASKS
    from vpeft.run import cache_data_root

    root = Path(spec.data_root) if spec.data_root else cache_data_root()
    if spec.generate in GENERATED_TASKS:
        GENERATED_TASKS[spec.generate](root)
    else:
        from vpeft.data.dsprites import ensure_dsprites_task

        ensure_dsprites_task(root, spec.generate)


def _data_root(spec: RunSpec) -> str | None:
    if spec.generate is not None and not spec.data_root:
        from vpeft.run import cache_data_root

        return str(cache_data_root())
    return spec.data_root


# ---- measurements -------------------------------------------------------------------------------------------------
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so an RSS baseline means something."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    On CUDA devices: ``torch.cuda.max_memory_allocated`` (``peak_bytes``) and its rise over the allocation at
    entry (``delta_bytes``). On CPU: the process's resident set size, sampled every ``interval`` seconds by a
    thread (``peak_bytes``), and its rise over the RSS at entry after freed memory was returned to the OS
    (``delta_bytes``: what the block needed: backbone, data, activations, gradients, optimiser state).
    """

    def __init__(self, device: str = "cpu", interval: float = 0.01) -> None:
        self.device, self.interval = torch.device(device), interval
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        self.base: int | None = None
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        self.base = self.peak_bytes = _rss_bytes()
        if self.base is not None:
            self._thread = threading.Thread(target=self._sample, name="vpeft-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > (self.peak_bytes or 0):
                self.peak_bytes = rss

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            rss = _rss_bytes()
            if rss is not None and rss > (self.peak_bytes or 0):
                self.peak_bytes = rss

    @property
    def delta_bytes(self) -> int | None:
        if self.peak_bytes is None or self.base is None:
            return None
        return self.peak_bytes - self.base


def _time_forward(
    model: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int, task: Any
) -> tuple[float, torch.Tensor]:
    """Median wall time (ms) of ``repeats`` forward passes after ``warmup`` passes, and the task's comparable
    output (:meth:`vpeft.tasks.base.Task.comparable_output`: the logits, for detection the pyramid maps)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            out = model(x)
            sync()
            times.append(1000 * (time.perf_counter() - start))
        out = task.comparable_output(model, x)
    return statistics.median(times), out.float().cpu()


def measure_latency(spec: RunSpec, delta: str | os.PathLike, img_size: int) -> dict[str, Any]:
    """Inference latency (ms per batch of random inputs: images, or clips of a video task) of the saved delta:
    unmerged, and merged if mergeable.

    The model is rebuilt from the stored delta (with its task's model around the backbone), so this also checks
    that the delta reloads; for mergeable methods the largest difference between merged and unmerged outputs is
    recorded.
    """
    from vpeft import merge
    from vpeft.registry import get_method
    from vpeft.run import model_from_delta

    lat = spec.latency
    model, _, task = model_from_delta(delta)
    model.eval().to(spec.device)
    x = task.example_input(lat["batch_size"], img_size, generator=torch.Generator().manual_seed(0)).to(spec.device)
    out: dict[str, Any] = {"batch_size": lat["batch_size"], "repeats": lat["repeats"], "unit": "ms/batch"}
    out["batch_of"] = task.sample_unit
    out["unmerged_ms"], logits = _time_forward(model, x, lat["warmup"], lat["repeats"], task)
    out["mergeable"] = bool(get_method(spec.method_name).mergeable)
    out["merged_ms"] = out["merge_max_abs_diff"] = None
    if out["mergeable"]:
        merge(model, keep_original=False)
        out["merged_ms"], merged = _time_forward(model, x, lat["warmup"], lat["repeats"], task)
        out["merge_max_abs_diff"] = float((merged - logits).abs().max())
    return out


# ---- the protocol -------------------------------------------------------------------------------------------------
def _request(spec: RunSpec, cand: Mapping[str, Mapping[str, Any]]) -> RunRequest:
    """The run of ``spec`` with a grid setting / tuned recipe ``cand`` (splits and output are set by each step)."""
    from vpeft.run import RunRequest
    from vpeft.train import TrainConfig

    return RunRequest(
        backbone=spec.backbone,
        method={"method": spec.method_name, **spec.settings, **cand.get("method", {})},
        task=spec.task,
        data_root=_data_root(spec),
        train_cfg=TrainConfig(**{**spec.train, **cand.get("train", {})}),
        img_size=spec.img_size,
        pretrained=spec.pretrained,
        device=spec.device,
        progress=False,
        task_kind=spec.task_kind,
        task_options=spec.task_options or None,
    )


def _select(spec: RunSpec, finetune: Callable[..., dict[str, Any]]) -> dict[str, Any] | None:
    """Step 1: every grid setting trained on ``train`` and scored on ``val``; ``None`` without a choice to make."""
    from vpeft.train import set_seed

    candidates = spec.candidates()
    if len(candidates) < 2:
        return None
    results, key = [], "val_score"
    for i, cand in enumerate(candidates):
        set_seed(spec.seed)  # method parameters are initialised before training seeds the RNG
        cpu = time.process_time()
        rec = finetune(_request(spec, cand), train_split=spec.splits["train"], eval_split=spec.splits["val"])
        cpu = time.process_time() - cpu
        key = f"val_{rec.primary_metric}"  # the task's own metric name: val_top1, val_miou ...
        results.append({"setting": cand, key: rec.score, "train_time_s": rec.train_time_s, "cpu_s": cpu})
        logger.info("%s: grid setting %d/%d %s: val %.4f", spec.run_id, i + 1, len(candidates), cand, rec.score)
        gc.collect()
    best = max(range(len(results)), key=lambda i: (results[i][key], -i))
    return {
        "train_split": spec.splits["train"],
        "val_split": spec.splits["val"],
        "results": results,
        "chosen": candidates[best],
        "chosen_index": best,
        "rule": "highest val score (the task's primary metric); ties go to the first setting in grid order",
        "kind": "grid",
        "candidates": len(candidates),
        "metric": key[len("val_") :],
        "best_val": results[best][key],
        "cpu_s": sum(r["cpu_s"] for r in results),
    }


def _tune_select(spec: RunSpec, out_dir: Path) -> dict[str, Any]:
    """Step 1 with a ``tune:`` block: Optuna's search on ``train`` / ``val`` (:func:`vpeft.tune.run_tune`, its
    study in ``out_dir/tune``, so a killed bench resumes it), the test split untouched; the chosen recipe in the
    grid's ``{"train": ..., "method": ...}`` form."""
    from vpeft.train import TrainConfig
    from vpeft.tune import TuneConfig, parse_space, run_tune

    block = dict(spec.tune)
    space = parse_space(spec.method_name, block.pop("space"))
    cfg = TuneConfig(**block, search_splits=(spec.splits["train"], spec.splits["val"]), final=False)
    summary = run_tune(
        backbone=spec.backbone,
        method={"method": spec.method_name, **spec.settings},
        task=spec.task,
        space=space,
        out_dir=out_dir / "tune",
        tune=cfg,
        train_cfg=TrainConfig(**spec.train),
        data_root=_data_root(spec),
        img_size=spec.img_size,
        pretrained=spec.pretrained,
        task_kind=spec.task_kind,
        task_options=spec.task_options or None,
        device=spec.device,
        on_trial=lambda line: logger.info("%s: %s", spec.run_id, line),
    )
    train, method = space.split(summary["best_params"])
    return {
        "train_split": spec.splits["train"],
        "val_split": spec.splits["val"],
        "chosen": {"train": train, "method": method},
        "rule": f"Optuna TPE, {cfg.trials} trials, pruner {cfg.pruner}: the best complete trial's val score",
        "kind": "tune",
        "trials": summary["trials"],
        "candidates": cfg.trials,
        "best_val": summary["best_val"],
        "cpu_s": summary["search_cpu_s"],
        "study": "tune",  # relative to the run folder
        "plots": [f"tune/{p}" for p in summary.get("plots", [])],
    }


def _zero_shot_on(model, extra: Mapping[str, Any], spec: RunSpec, task_name: str, **options: Any) -> dict[str, Any]:
    """Evaluate the adapted CLIP towers of ``model`` zero-shot on ``task_name``'s test split (its class names)."""
    from vpeft.data import build_dataloader
    from vpeft.run import open_task
    from vpeft.train import evaluate

    folder = open_task(_data_root(spec), task_name)
    task = folder.task("zeroshot", **options)
    target = task.build(model.backbone).to(spec.device)
    ds = task.dataset(folder.path, spec.splits["test"], target, input_size=extra.get("img_size"))
    return evaluate(target, build_dataloader(ds, 64, shuffle=False), spec.device, task=task)


def _evaluator(spec: RunSpec, delta: Path) -> Callable[..., Mapping[str, Any]]:
    """``evaluate_on(task_name=None, **options)`` for the protocols: the trained delta's towers evaluated zero-shot
    on a task's test split (``None``: the run's own task); the model is rebuilt from the delta once, on first use."""
    from vpeft.run import model_from_delta

    built: list[Any] = []

    def evaluate_on(task_name: str | None = None, **options: Any) -> Mapping[str, Any]:
        if not built:
            built.extend(model_from_delta(delta)[:2])
        model, extra = built
        return _zero_shot_on(model, extra, spec, task_name or spec.task, **options)

    return evaluate_on


def _class_names(spec: RunSpec) -> list[str] | None:
    """The task folder's ``classes.txt`` (for per-class tables), ``None`` without one."""
    root = _data_root(spec)
    if not root:
        return None
    try:
        lines = (Path(root) / spec.task / "classes.txt").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return [line.strip() for line in lines if line.strip()]


def _drop_stale_checkpoint(out_dir: Path, train_cfg) -> None:
    """Remove a training checkpoint written under another recipe (an edited definition): it cannot be resumed."""
    from vpeft.train.checkpoint import CHECKPOINT_NAME, read_checkpoint

    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():  # a final run finished without its record (killed in between): it runs again
        (out_dir / "result.json").unlink(missing_ok=True)
        return
    try:
        read_checkpoint(path, train_cfg.to_dict())
    except VpeftError as exc:
        logger.warning("%s: not resuming (%s); training from scratch", path, exc)
        path.unlink(missing_ok=True)


def _final_run(finetune: Callable[..., Any], request: RunRequest, spec: RunSpec, out_dir: Path) -> Any:
    """The final run, resumed from its checkpoint; one of another run (other data, options) is dropped."""
    from vpeft.train.checkpoint import CHECKPOINT_NAME, ResumeMismatchError

    splits = {"train_split": spec.splits["trainval"], "eval_split": spec.splits["test"], "out_dir": out_dir}
    try:
        return finetune(request, **splits, resume=True)
    except ResumeMismatchError as exc:
        logger.warning("%s: not resuming (%s); training from scratch", out_dir / CHECKPOINT_NAME, exc)
        (out_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        return finetune(request, **splits, resume=True)


def execute_run(spec: RunSpec, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run the protocol for one (method, task, seed); return the metrics part of its record.

    Writes the final run's ``delta.safetensors``, ``metrics.json`` and ``result.json`` into ``out_dir``.
    """
    from vpeft.run import finetune
    from vpeft.train import set_seed

    ensure_task(spec)
    selection = _tune_select(spec, Path(out_dir)) if spec.tune else _select(spec, finetune)
    chosen = selection["chosen"] if selection else {"train": {}, "method": {}}
    set_seed(spec.seed)
    request = _request(spec, chosen)
    _drop_stale_checkpoint(Path(out_dir), request.train_cfg)
    with PeakMemory(spec.device) as mem:  # a run killed during its final training continues from its checkpoint
        run = _final_run(finetune, request, spec, Path(out_dir))
    latency = measure_latency(spec, Path(out_dir) / "delta.safetensors", run.to_dict()["img_size"])
    measured = _after_training(spec, run, Path(out_dir))
    return _metrics_record(spec, run, measured, mem, latency, selection)


def _after_training(spec: RunSpec, run: Any, out_dir: Path) -> dict[str, Any]:
    """What the task type's protocol measures on the trained delta (e.g. base-to-novel), and transfers."""
    protocol = get_protocol(spec.protocol)
    evaluate_on = _evaluator(spec, out_dir / "delta.safetensors")
    b2n = protocol.after_training(run.score, spec.task_options, evaluate_on)
    score = b2n[protocol.primary_metric] if protocol.primary_metric else run.score
    transfer = Transfer(spec.transfer_to).after_training(evaluate_on) if spec.transfer_to else None
    return {
        **({"transfer": transfer} if transfer is not None else {}),
        "top1": score,  # the primary metric (kept under its historical name; "score" and "primary_metric" too)
        "score": score,
        **b2n,
        "primary_metric": protocol.primary_metric or run.primary_metric,
    }


def _metrics_record(spec: RunSpec, run: Any, measured: dict[str, Any], mem: PeakMemory, latency: Any,
                    selection: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """The metrics part of a run's record: the protocol's scores, the final run's test metrics, counts and costs."""
    final = run.to_dict()
    return {
        **measured,
        "task_kind": run.task_spec.get("kind"),
        "test_metrics": {k: v for k, v in run.metrics.items() if k not in ("loss", "n")},
        "decoder_params": run.decoder_params,
        "decoder": run.task_spec.get("decoder"),  # None for tasks without one
        "detector": run.task_spec.get("detector"),  # detection tasks: the torchvision detector
        "class_names": run.task_spec.get("class_names") or _class_names(spec),  # the task's own, else classes.txt
        "test_n": run.eval_n,
        "test_loss": final["eval_loss"],
        "trainable_params": final["trainable_params"],
        "method_params": final["method_params"],
        "total_params": final["total_params"],
        "delta_bytes": final.get("delta_bytes"),
        "peak_train_mem_bytes": mem.delta_bytes,
        "peak_mem_bytes": mem.peak_bytes,
        "peak_mem_kind": mem.kind,
        "train_images_per_s": final["train_images_per_s"],
        "train_time_s": final["train_time_s"],
        "eval_time_s": final["eval_time_s"],
        "final_train_top1": final["final_train_top1"],
        "latency": latency,
        "selection": selection,
        "resolved": {
            "method_config": final["config"],
            "train": final["train"],
            "img_size": final["img_size"],
            "num_classes": final["num_classes"],
            "train_split": final["train_split"],
            "eval_split": final["eval_split"],
        },
    }


def run_and_record(spec: RunSpec, out_dir: str | os.PathLike, fingerprint: str | None = None) -> dict[str, Any]:
    """:func:`execute_run` and write ``out_dir/record.json``: status ``ok``, or ``failed`` with the error.

    Never raises for a failing run (the grid goes on); ``KeyboardInterrupt`` still propagates.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {**spec.record_fields(fingerprint), "started_at": _now()}
    start = time.perf_counter()
    try:
        metrics = execute_run(spec, out_dir)
        record = {**base, "status": "ok", **metrics}
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the others go on
        logger.error("%s failed: %s: %s", spec.run_id, type(exc).__name__, exc)
        record = {
            **base,
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    record.update(
        finished_at=_now(), duration_s=time.perf_counter() - start, env=environment(spec.device), pid=os.getpid()
    )
    write_record(out_dir / "record.json", record)
    return record
