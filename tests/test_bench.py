"""vpeft bench / report: definitions, the protocol (test split read once, at the end), resume, failure isolation,
the leaderboard (Markdown, HTML in a real headless Chromium), and the dSprites generator.

Runs use timm's tiny random ``test_vit`` at 32 px on a tiny generated two-class task, so the file stays fast.
"""

from __future__ import annotations

import builtins
import html
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_worker import crash_or_run, hang_or_run, hang_or_run_ray
from PIL import Image

import vpeft.run
from vpeft.bench import build_leaderboard, load_definition, parse_definition, render_markdown, run_bench, write_report
from vpeft.bench.definition import check_run_timeout
from vpeft.bench.records import load_records, read_record, record_path, run_dir, write_record
from vpeft.bench.runner import Deadlines, Progress, _run_pool, default_parallelism, plan_runs
from vpeft.cli import main
from vpeft.data.dsprites import DSPRITES_TASKS, FACTOR_SIZES, ensure_dsprites_task
from vpeft.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train800": 24, "val200": 8, "test": 16}


def _write_tiny_task(root: Path, name: str = "tiny") -> Path:
    """Two classes: bright left half vs bright right half, 8x8 RGB PNGs, VTAB-1k lists and classes.txt."""
    rng = np.random.default_rng(0)
    task = root / name
    (task / "images").mkdir(parents=True)
    lists: dict[str, list[str]] = {}
    i = 0
    for split, n in SIZES.items():
        lines = []
        for k in range(n):
            label = k % 2
            img = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
            img[:, :4] += np.uint8(150) if label == 0 else np.uint8(0)
            img[:, 4:] += np.uint8(150) if label == 1 else np.uint8(0)
            Image.fromarray(img).save(task / "images" / f"{i:03d}.png")
            lines.append(f"images/{i:03d}.png {label}")
            i += 1
        lists[split] = lines
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (task / "classes.txt").write_text("left\nright\n")
    return task


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread contention makes them 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-data")
    _write_tiny_task(root)
    return root


def _definition(data_root: Path, **overrides) -> dict:
    d = {
        "name": "tiny",
        "backbone": "test_vit",
        "img_size": 32,
        "pretrained": False,
        "seeds": [0],
        "data_root": str(data_root),
        "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0, "lr": 1e-2},
        "latency": {"batch_size": 2, "warmup": 0, "repeats": 1},
        "tasks": [{"name": "tiny", "group": "natural"}],
        "methods": [{"name": "linear"}],
    }
    d.update(overrides)
    return d


# ---- definitions --------------------------------------------------------------------------------------------------
def test_shipped_definitions_validate():
    vtab = load_definition(ROOT / "experiments" / "vtab1k_vitb16.yaml")
    groups = [t.group for t in vtab.tasks]
    assert len(vtab.tasks) == 19 and groups.count("natural") == 7 and groups.count("specialized") == 4
    assert groups.count("structured") == 8 and vtab.img_size == 224 and len(vtab.seeds) == 3
    fgvc = load_definition(ROOT / "experiments" / "fgvc_vitb16.yaml")
    assert len(fgvc.tasks) == 5 and {t.group for t in fgvc.tasks} == {"fgvc"}
    assert fgvc.tasks[0].splits.trainval == "trainval"
    mini = load_definition(ROOT / "experiments" / "mini.yaml")
    assert mini.backbone == "dinov2_vits14_imgfocus" and 56 <= mini.img_size <= 112
    assert {t.group for t in mini.tasks} == {"natural", "specialized", "structured"}
    assert {t.generate for t in mini.tasks if t.generate} == {"digits", "dsprites_loc", "dsprites_ori"}
    required = {"linear", "full", "bitfit", "lora", "adapter", "adaptformer", "vpt_deep", "ssf"}
    assert required <= {m.name for m in mini.methods} and len(mini.seeds) == 2
    assert isinstance(mini.methods[0].train["lr"], float), "YAML 1.2 floats: 1.0e-2 and 1e-2 are numbers"


def test_yaml_exponent_floats_and_grid(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(
        "name: t\nbackbone: test_vit\ntasks: [{name: a, group: natural}]\ntrain: {lr: 1e-3}\n"
        "methods:\n  - {name: lora, label: lora_grid, grid: {lr: [1e-3, 3e-3], r: [2, 4]}}\n"
    )
    d = load_definition(path)
    assert d.train["lr"] == 1e-3
    cands = d.methods[0].candidates()
    assert len(cands) == 4 and cands[0] == {"train": {"lr": 1e-3}, "method": {"r": 2}}
    (run,) = d.runs()
    assert run.method_label == "lora_grid" and run.train["seed"] == 0 and run.data_root is None  # resolved by run_bench


@pytest.mark.parametrize(
    "change,message",
    [
        ({"backbon": "x"}, "definition: unknown key 'backbon'. Did you mean 'backbone'"),
        ({"methods": [{"name": "lorra"}]}, "definition.methods[0].name: unknown method 'lorra'. Did you mean 'lora'"),
        ({"methods": [{"name": "lora", "settings": {"r": 0}}]}, "methods[0].settings: lora: r=0 is invalid"),
        ({"methods": [{"name": "lora", "settings": {"rank": 2}}]}, "unknown option(s) rank"),
        ({"methods": [{"name": "lora", "train": {"lr": -1}}]}, "methods[0].train: TrainConfig.lr must be"),
        ({"methods": [{"name": "lora", "grid": {"rr": [1]}}]}, "methods[0].grid.rr: unknown grid key"),
        ({"methods": [{"name": "lora", "grid": {"lr": []}}]}, "expected a non-empty list of candidate values"),
        ({"methods": [{"name": "lora", "grid": {"r": [4, 0]}}]}, "grid (setting 1"),
        ({"methods": ["linear", "linear"]}, "methods[1]: 'linear' appears twice"),
        ({"tasks": [{"name": "a", "group": "natual"}]}, "tasks[0].group: unknown group 'natual'. Did you mean"),
        ({"tasks": [{"name": "a", "group": "natural", "generate": "mnist"}]}, "unknown generator 'mnist'"),
        ({"tasks": [{"name": "a"}]}, "tasks[0]: missing required key(s) group"),
        ({"seeds": [0, 0]}, "seeds repeat"),
        ({"train": {"epochs": 0}}, "definition.train: TrainConfig.epochs must be"),
        ({"train": {"epoch": 3}}, "unknown training option 'epoch'. Did you mean 'epochs'"),
        ({"img_size": "big"}, "definition.img_size: expected an int"),
        ({"run_timeout_s": 0}, "definition.run_timeout_s: expected a number of seconds > 0"),
        ({"run_timeout_s": "10m"}, "definition.run_timeout_s: expected a number of seconds > 0"),
    ],
)
def test_definition_errors_name_the_place(change, message):
    data = {"name": "t", "backbone": "test_vit", "tasks": [{"name": "a", "group": "natural"}], "methods": ["lora"]}
    data.update(change)
    with pytest.raises(ConfigError) as exc:
        parse_definition(data)
    assert message in str(exc.value), str(exc.value)


def test_run_selection_and_parallelism(monkeypatch, data_root):
    d = parse_definition(_definition(data_root, seeds=[0, 1], methods=["linear", "bitfit"]))
    assert len(d.runs()) == 4 and len(d.runs(methods=["bitfit"], seeds=[1])) == 1
    with pytest.raises(ConfigError, match="unknown method label 'bitfi'. Did you mean 'bitfit'"):
        d.runs(methods=["bitfi"])
    with pytest.raises(ConfigError, match="seed 7 is not in the definition's seeds"):
        d.runs(seeds=[7])
    monkeypatch.setattr("vpeft.bench.runner.cpu_count", lambda: 2)
    assert default_parallelism() == (1, 2)
    monkeypatch.setattr("vpeft.bench.runner.cpu_count", lambda: 16)
    assert default_parallelism() == (4, 4) and default_parallelism(2) == (2, 8)


# ---- the protocol -------------------------------------------------------------------------------------------------
def test_protocol_test_split_read_once_after_final_training(monkeypatch, tmp_path, data_root):
    """Instrument every file opened under the task folder, every training call and every evaluation: the test list
    and test images are opened only after the grid was decided on val200, test images only after the final training
    ended, and each test image exactly once (one evaluation)."""
    task_dir = data_root / "tiny"
    test_images = {str(task_dir / line.split()[0]) for line in (task_dir / "test.txt").read_text().splitlines()}
    events: list[tuple[str, str]] = []

    def logged_open(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(task_dir)):
                events.append(("open", str(file)))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", logged_open(builtins.open))
    monkeypatch.setattr(io, "open", logged_open(io.open))
    real_train, real_eval = vpeft.run.train, vpeft.run.evaluate

    def train(model, loader, cfg, **kw):
        events.append(("train_start", loader.dataset.split))
        out = real_train(model, loader, cfg, **kw)
        events.append(("train_end", loader.dataset.split))
        return out

    def evaluate(model, loader, *a, **kw):
        events.append(("eval", loader.dataset.split))
        return real_eval(model, loader, *a, **kw)

    monkeypatch.setattr(vpeft.run, "train", train)
    monkeypatch.setattr(vpeft.run, "evaluate", evaluate)
    methods = [{"name": "lora", "settings": {"r": 2}, "grid": {"lr": [1e-4, 3e-2]}}]
    d = parse_definition(_definition(data_root, methods=methods))
    summary = run_bench(d, tmp_path / "out", workers=0, progress=False)
    assert summary.ok == 1, summary

    phases = [e for e in events if e[0] != "open"]
    assert phases == [
        ("train_start", "train800"), ("train_end", "train800"), ("eval", "val200"),
        ("train_start", "train800"), ("train_end", "train800"), ("eval", "val200"),
        ("train_start", "train800val200"), ("train_end", "train800val200"), ("eval", "test"),
    ]  # fmt: skip
    last_val = events.index(("eval", "val200"), events.index(("eval", "val200")) + 1)
    final_end = events.index(("train_end", "train800val200"))
    test_list = [i for i, e in enumerate(events) if e == ("open", str(task_dir / "test.txt"))]
    assert len(test_list) == 1 and test_list[0] > last_val, "test.txt is read once, after the selection"
    test_opens = [i for i, e in enumerate(events) if e[0] == "open" and e[1] in test_images]
    assert test_opens and min(test_opens) > final_end, "no test image is read before the final training ends"
    assert len(test_opens) == len(test_images) == SIZES["test"], "each test image is read exactly once"

    rec = read_record(record_path(tmp_path / "out", "lora", "tiny", 0))
    sel = rec["selection"]
    assert [r["setting"]["train"]["lr"] for r in sel["results"]] == [1e-4, 3e-2]
    best = max(range(2), key=lambda i: (sel["results"][i]["val_top1"], -i))
    assert sel["metric"] == "top1" and sel["best_val"] == sel["results"][best]["val_top1"]
    assert sel["chosen_index"] == best and rec["resolved"]["train"]["lr"] == sel["chosen"]["train"]["lr"]
    assert rec["resolved"]["train_split"] == "train800val200" and rec["test_n"] == SIZES["test"]


def test_a_grid_selection_names_the_tasks_own_metric(data_root):
    """A segmentation run's grid records val_miou (not val_top1): every record names its metric by the task's name."""
    import types

    from vpeft.bench.protocol import _select

    methods = [{"name": "lora", "grid": {"lr": [1e-4, 3e-2, 1e-3]}}]
    spec = parse_definition(_definition(data_root, methods=methods)).runs()[0]
    scores = iter([0.25, 0.5, 0.5])

    def finetune(*_, **__):
        return types.SimpleNamespace(score=next(scores), primary_metric="miou", train_time_s=0.0)

    sel = _select(spec, finetune)
    assert [sorted(r) for r in sel["results"]] == [["cpu_s", "setting", "train_time_s", "val_miou"]] * 3
    assert sel["metric"] == "miou" and sel["best_val"] == 0.5 and sel["chosen_index"] == 1  # ties: the first


def test_record_contents_and_resume(tmp_path, data_root):
    out = tmp_path / "out"
    d = parse_definition(_definition(data_root, seeds=[0, 1], methods=["lora"]))
    first = run_bench(d, out, workers=0, progress=False)
    assert (first.ok, first.skipped, first.failed) == (2, 0, 0)
    rec = read_record(record_path(out, "lora", "tiny", 0))
    for key in ("top1", "trainable_params", "delta_bytes", "peak_train_mem_bytes", "train_images_per_s", "spec"):
        assert rec[key] is not None, key
    assert rec["status"] == "ok" and 0 <= rec["top1"] <= 1 and rec["resolved"]["method_config"]["r"] == 8
    assert rec["env"]["torch"] and rec["env"]["vpeft"] and "commit" in rec["env"]["git"]
    lat = rec["latency"]
    assert lat["mergeable"] and lat["unmerged_ms"] > 0 and lat["merged_ms"] > 0 and lat["merge_max_abs_diff"] < 1e-4
    assert rec["delta_bytes"] == (run_dir(out, "lora", "tiny", 0) / "delta.safetensors").stat().st_size
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files"
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("record.json")}

    again = run_bench(d, out, workers=0, progress=False)
    assert (again.ok, again.skipped) == (0, 2), "finished runs are skipped"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("record.json")} == mtimes, "and their records untouched"

    record_path(out, "lora", "tiny", 1).unlink()  # a run interrupted before it finished
    resumed = run_bench(d, out, workers=0, progress=False)
    assert (resumed.ok, resumed.skipped) == (1, 1)

    changed = parse_definition(_definition(data_root, seeds=[0, 1], methods=["lora"], train={"epochs": 2}))
    redone = run_bench(changed, out, workers=0, progress=False, seeds=[0])
    assert (redone.ok, redone.skipped) == (1, 0), "a record of another definition of the run is not reused"


def test_image_folder_task_with_named_splits(tmp_path, data_root):
    """FGVC-style folders: one image folder per split, mapped onto the protocol by the task's ``splits``."""
    src = data_root / "tiny"
    for split, vtab in (("train", "train800"), ("val", "val200"), ("trainval", "train800val200"), ("test", "test")):
        for line in (src / f"{vtab}.txt").read_text().splitlines():
            path, label = line.split()
            dst = tmp_path / "fgvc" / "birds" / split / ("left", "right")[int(label)] / Path(path).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / path, dst)
    splits = {"train": "train", "val": "val", "trainval": "trainval", "test": "test"}
    tasks = [{"name": "birds", "group": "fgvc", "root": str(tmp_path / "fgvc"), "splits": splits}]
    methods = [{"name": "linear", "grid": {"lr": [1e-3, 1e-2]}}]
    d = parse_definition(_definition(data_root, tasks=tasks, methods=methods))
    assert run_bench(d, tmp_path / "out", workers=0, progress=False).ok == 1
    rec = read_record(record_path(tmp_path / "out", "linear", "birds", 0))
    assert rec["selection"]["train_split"] == "train" and rec["selection"]["val_split"] == "val"
    assert rec["resolved"]["train_split"] == "trainval" and rec["test_n"] == SIZES["test"]


def test_failures_are_recorded_and_do_not_stop_the_grid(tmp_path, data_root):
    d = parse_definition(_definition(data_root, methods=["vpt_deep", "linear"], backbone="test_efficientnet"))
    summary = run_bench(d, tmp_path / "out", workers=0, progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    failed = read_record(record_path(tmp_path / "out", "vpt_deep", "tiny", 0))
    assert failed["status"] == "failed" and failed["error"].startswith("UnsupportedBackboneError")
    assert "Traceback" in failed["traceback"]
    md = write_report(tmp_path / "out")[0]
    assert "Failed runs (1)" in md and "vpt_deep/tiny/seed0" in md and "| linear probe |" in md


def test_process_pool_survives_a_dying_worker(tmp_path, data_root):
    methods = [{"name": "linear", "label": "crash"}, {"name": "linear"}]
    d = parse_definition(_definition(data_root, methods=methods))
    out = tmp_path / "out"
    stream = io.StringIO()
    stale = {"run_id": "crash/tiny/seed0", "status": "failed", "error": "an older attempt"}  # to be retried
    write_record(record_path(out, "crash", "tiny", 0), {**stale, "fingerprint": d.runs()[0].fingerprint()})
    records = _run_pool(d.runs(), out, 1, 1, Progress(2, 1, stream), False, target=crash_or_run)
    status = {r["method"]: r["status"] for r in records}
    assert status == {"crash": "failed", "linear": "ok"}
    crashed = read_record(record_path(out, "crash", "tiny", 0))
    assert crashed["error"].startswith("WorkerDied") and "exit code 3" in crashed["error"]
    log = stream.getvalue()
    assert "FAILED crash/tiny/seed0" in log and "[bench 2/2] done 1 | running 0 | failed 1" in log


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _prepare_ok_record(out: Path, spec) -> None:
    """What a successful run would record, for a fake worker to publish (a real run takes longer than the limit)."""
    rec = {"run_id": spec.run_id, "method": spec.method_label, "task": spec.task, "seed": spec.seed, "status": "ok"}
    write_record(run_dir(out, spec.method_label, spec.task, spec.seed) / "prepared.json",
                 {**rec, "fingerprint": spec.fingerprint(), "top1": 0.5})  # fmt: skip


def test_process_pool_stops_a_run_past_its_time_limit(tmp_path, data_root):
    """A run that hangs (ignoring SIGTERM, with a child that does too) is killed at the limit with its child and
    recorded as failed; its sibling, running alongside, finishes; a re-run retries only the timed-out run."""
    methods = [{"name": "linear", "label": "hang"}, {"name": "linear"}]
    d = parse_definition(_definition(data_root, methods=methods))
    out, stream = tmp_path / "out", io.StringIO()
    _prepare_ok_record(out, d.runs()[1])
    records = _run_pool(
        d.runs(), out, 2, 1, Progress(2, 2, stream), False, target=hang_or_run, run_timeout_s=3, kill_grace_s=1
    )
    assert {r["method"]: r["status"] for r in records} == {"hang": "failed", "linear": "ok"}
    hung = read_record(record_path(out, "hang", "tiny", 0))
    assert re.fullmatch(r"RunTimeout: timed out after \d+ s \(limit --run-timeout 3\)", hung["error"]), hung["error"]
    assert hung["timed_out"] and hung["run_timeout_s"] == 3 and hung["fingerprint"] == d.runs()[0].fingerprint()
    assert "a data loader that never answers" in hung["log_tail"]
    children = [int((run_dir(out, m, "tiny", 0) / "child.pid").read_text()) for m in ("hang", "linear")]
    deadline = time.monotonic() + 10
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [_alive(pid) for pid in children]
    for pid in (pid for pid, a in zip(children, alive) if a):  # don't leave them running if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive[0], "the run's child process (a data-loader worker) is killed with it"
    assert not alive[1], "a child left behind by a finished worker is killed too"
    log = stream.getvalue()
    assert "FAILED hang/tiny/seed0: RunTimeout: timed out after" in log
    assert "[bench 2/2] done 1 | running 0 | failed 1" in log
    todo, done = plan_runs(d.runs(), out)
    assert [s.run_id for s in todo] == ["hang/tiny/seed0"] and len(done) == 1, "a re-run retries the timed-out run"


def test_deadlines_bookkeeping():
    now = [100.0]
    dl = Deadlines(10.0, clock=lambda: now[0])
    assert dl.wait_s(30.0) == 30.0 and dl.overdue() == []
    dl.start("a")
    now[0] = 104.0
    dl.start("b")
    assert dl.wait_s(30.0) == pytest.approx(6.0) and dl.wait_s(2.0) == 2.0
    now[0] = 110.5
    assert dl.overdue() == ["a"] and dl.wait_s(30.0) == 0.0
    assert dl.stop("a") == pytest.approx(10.5) and dl.stop("a") == 0.0
    assert dl.wait_s(30.0) == pytest.approx(3.5)
    now[0] = 200.0
    assert dl.overdue() == ["b"]
    unlimited = Deadlines(None, clock=lambda: now[0])
    unlimited.start("a")
    now[0] = 1e9
    assert unlimited.overdue() == [] and unlimited.wait_s(30.0) == 30.0


@pytest.mark.parametrize("value", [0, -1, -0.5, "0", "abc", "", "nan", "inf", float("inf"), True, [5]])
def test_run_timeout_rejects_bad_values(value):
    with pytest.raises(ConfigError, match=r"--run-timeout: expected a number of seconds > 0 .*got"):
        check_run_timeout(value, "--run-timeout")


def test_run_timeout_values_and_definition_field(tmp_path, data_root):
    assert check_run_timeout(None) is None and check_run_timeout("2.5") == 2.5 and check_run_timeout(600) == 600.0
    path = tmp_path / "d.yaml"
    path.write_text(
        "name: t\nbackbone: test_vit\nrun_timeout_s: 900\ntasks: [{name: a, group: natural}]\nmethods: [lora]\n"
    )
    d = load_definition(path)
    assert d.run_timeout_s == 900.0 and d.to_dict()["run_timeout_s"] == 900.0
    assert load_definition(ROOT / "experiments" / "mini.yaml").run_timeout_s is None, "default: no limit"
    inline = parse_definition(_definition(data_root))
    with pytest.raises(ConfigError, match="--run-timeout 5 needs worker processes: with --workers 0"):
        run_bench(inline, tmp_path / "out", workers=0, run_timeout_s=5, progress=False)
    with pytest.raises(ConfigError, match="--run-timeout: expected a number of seconds > 0"):
        run_bench(inline, tmp_path / "out", workers=1, run_timeout_s=-3, progress=False)
    assert not (tmp_path / "out").exists(), "bad options are refused before anything is written"


@pytest.mark.slow
def test_ray_backend_runs_each_run_as_a_ray_task(tmp_path, data_root):
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    d = parse_definition(_definition(data_root, methods=["linear", "vpt_deep"], backbone="test_efficientnet"))
    out = tmp_path / "out"
    summary = run_bench(d, out, backend="ray", workers=1, threads=1, progress=False)
    assert (summary.ok, summary.failed) == (1, 1)
    recs = {r["method"]: r for r in load_records(out)}
    assert recs["linear"]["status"] == "ok" and recs["linear"]["pid"] != os.getpid(), "ran in a Ray worker"
    assert recs["vpt_deep"]["error"].startswith("UnsupportedBackboneError")
    assert (run_dir(out, "linear", "tiny", 0) / "delta.safetensors").is_file()
    again = run_bench(d, out, methods=["linear"], backend="ray", workers=1, threads=1, progress=False)
    assert (again.skipped, again.ok) == (1, 0), "finished runs are skipped on Ray too (Ray is not even started)"


@pytest.mark.slow
def test_ray_backend_cancels_a_run_past_its_time_limit(tmp_path, data_root):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    import bench_worker

    from vpeft.bench.ray_backend import run_ray

    methods = [{"name": "linear", "label": "hang"}, {"name": "linear"}]
    d = parse_definition(_definition(data_root, methods=methods))
    out, stream = tmp_path / "out", io.StringIO()
    _prepare_ok_record(out, d.runs()[1])
    ray.cloudpickle.register_pickle_by_value(bench_worker)  # the Ray workers cannot import the tests folder
    try:
        records = run_ray(d.runs(), out, None, 2, 1, Progress(2, 2, stream), run_timeout_s=3, task=hang_or_run_ray)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(bench_worker)
    assert {r["method"]: r["status"] for r in records} == {"hang": "failed", "linear": "ok"}
    hung = read_record(record_path(out, "hang", "tiny", 0))
    assert re.fullmatch(r"RunTimeout: timed out after \d+ s \(limit --run-timeout 3\)", hung["error"]), hung["error"]
    assert read_record(record_path(out, "linear", "tiny", 0))["status"] == "ok"
    assert "[bench 2/2] done 1 | running 0 | failed 1" in stream.getvalue()


# ---- report -------------------------------------------------------------------------------------------------------
def _fake(method, task, group, seed, top1, params, status="ok"):
    rec = {
        "run_id": f"{method}/{task}/seed{seed}", "method": method, "method_name": method, "task": task,
        "group": group, "seed": seed, "status": status, "fingerprint": "x", "env": {"vpeft": "0", "torch": "2"},
    }  # fmt: skip
    if status != "ok":
        return {**rec, "error": "RuntimeError: boom"}
    return {
        **rec, "top1": top1, "trainable_params": params, "method_params": params - 10, "total_params": 10_000,
        "delta_bytes": 4 * params, "peak_train_mem_bytes": 2**20 * params / 100, "train_images_per_s": 1e4 / params,
        "train_time_s": params / 10, "latency": {"batch_size": 8, "unmerged_ms": 5.0, "merged_ms": 4.0},
    }  # fmt: skip


def _fake_records():
    tasks = [("a", "natural"), ("b", "natural"), ("c", "structured")]
    recs = []
    for method, base, params in (("small", 0.5, 100), ("big", 0.7, 5000), ("mid", 0.6, 1000)):
        for seed in (0, 1):
            for i, (t, g) in enumerate(tasks):
                recs.append(_fake(method, t, g, seed, base + 0.1 * i + 0.02 * seed, params))
    recs.append(_fake("mid", "a", "natural", 2, None, 1000, status="failed"))
    recs.append(_fake("partial", "a", "natural", 0, 0.9, 50))  # has only task a: no aggregate
    return recs


def test_leaderboard_statistics():
    lb = build_leaderboard(_fake_records())
    assert [t for t, _ in lb.tasks] == ["a", "b", "c"] and lb.groups == ["natural", "structured"]
    rows = {r.label: r for r in lb.rows}
    small = rows["small"]
    assert small.cells["a"].mean == pytest.approx(0.51) and small.cells["a"].std == pytest.approx(0.02 / 2**0.5)
    assert small.groups["natural"].mean == pytest.approx(0.56)
    assert small.groups["structured"].mean == pytest.approx(0.71)
    assert small.mean_tasks.mean == pytest.approx(0.61)
    assert small.mean_groups.mean == pytest.approx((0.56 + 0.71) / 2)
    assert rows["partial"].mean_tasks.mean is None and rows["partial"].complete_seeds == []
    assert [r.label for r in lb.rows][:3] == ["big", "mid", "small"] and len(lb.failures) == 1
    md = render_markdown(lb)
    # big: tasks a, b, c at 70/80/90 (+2 for seed 1); natural = mean(a, b); mean of groups = (76 + 91) / 2
    big = ["big", "0.005", *(f"{v} ± 1.4" for v in ("71.0", "81.0", "91.0", "76.0", "91.0", "81.0", "83.5")), "2"]
    assert "| " + " | ".join(big) + " |" in md
    assert "| partial fine-tuning | 0.000 | 90.0 | - | - | - | - | - | - | 0 |" in md, "a method by its readable name"
    assert "mid/a/seed2`: RuntimeError: boom" in md


def _write_fake_results(out: Path) -> None:
    for rec in _fake_records():
        write_record(record_path(out, rec["method"], rec["task"], rec["seed"]), rec)


def test_report_writes_markdown_and_self_contained_html(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install 'vpeft[bench]')")
    out = tmp_path / "results"
    _write_fake_results(out)
    assert len(load_records(out)) == 20
    assert main(["report", str(out), "--html", str(tmp_path / "lb.html")]) == 0
    assert "| big |" in capsys.readouterr().out
    page = (tmp_path / "lb.html").read_text()
    assert (out / "leaderboard.md").is_file() and page.count('class="sortable"') == 2
    assert page.count("data:image/png;base64,") == 2 and 'id="plot-params"' in page and 'id="plot-cost"' in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "no external resources"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


_PROBE = """<script>
window.addEventListener('load', () => {
  const order = () => Array.from(document.querySelectorAll('#accuracy tbody tr')).map(r => r.cells[0].textContent);
  const th = key => document.querySelector(`#accuracy th[data-key="${key}"]`);
  const res = {initial: order()};
  th('mean_groups').click(); res.meanDesc = order();
  th('mean_groups').click(); res.meanAsc = order(); res.ariaAsc = th('mean_groups').getAttribute('aria-sort');
  th('method').click(); res.byName = order();
  th('params').click(); res.paramsDesc = order();
  res.images = Array.from(document.images).map(i => ({id: i.id, ok: i.complete && i.naturalWidth > 100}));
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script></body>"""


def test_html_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install 'vpeft[bench]')")
    out = tmp_path / "results"
    _write_fake_results(out)
    _, _, html_path = write_report(out)
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", _PROBE))
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no probe output; chromium rc {proc.returncode}: {proc.stderr[-2000:]}"
    res = json.loads(html.unescape(found.group(1)))
    partial = "partial fine-tuning"
    assert res["initial"] == ["big", "mid", "small", partial], "the page loads with the rows ranked"
    assert res["meanDesc"][:3] == ["big", "mid", "small"] and res["meanAsc"][:3] == ["small", "mid", "big"]
    assert res["meanAsc"][-1] == partial and res["ariaAsc"] == "ascending", "rows without a value sort last"
    assert res["byName"] == ["big", "mid", partial, "small"] and res["paramsDesc"][0] == "big"
    assert [i["id"] for i in res["images"]] == ["plot-params", "plot-cost"] and all(i["ok"] for i in res["images"])


# ---- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_bench_then_report(tmp_path, data_root, capsys):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(_definition(data_root)))
    out = tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 ok, 0 failed, 0 already done (of 1)" in printed and (out / "leaderboard.md").is_file()
    assert main(["bench", str(path), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert "0 ok, 0 failed, 1 already done" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "| linear probe |" in capsys.readouterr().out


def test_cli_run_timeout_from_the_definition_and_the_command_line(tmp_path, data_root, capsys, caplog):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(_definition(data_root, run_timeout_s=600)))
    out = tmp_path / "out"
    assert main(["bench", str(path), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    assert "run_timeout_s (600 s) is not enforced with workers=0" in caplog.text, "in-process: a warning only"
    assert json.loads((out / "definition.json").read_text())["run_timeout_s"] == 600
    assert main(["bench", str(path), "--out", str(out), "--workers", "1", "--run-timeout", "30", "--quiet"]) == 0
    assert "0 ok, 0 failed, 1 already done" in capsys.readouterr().out
    assert json.loads((out / "definition.json").read_text())["run_timeout_s"] == 30, "the command line overrides"


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.yaml"], "bench definition 'missing.yaml' does not exist"),
        (["{def}", "--only", "lorra"], "unknown method label 'lorra'"),
        (["{def}", "--tasks", "nope"], "unknown task 'nope'"),
        (["{def}", "--seeds", "x"], "--seeds must be comma-separated integers"),
        (["{def}", "--data-root", "{tmp}"], "task folder(s) not found: tiny (looked in"),
        (["{def}", "--run-timeout", "0"], "--run-timeout: expected a number of seconds > 0 (a per-run wall-clock"),
        (["{def}", "--run-timeout", "-5"], "--run-timeout: expected a number of seconds > 0"),
        (["{def}", "--run-timeout", "10m"], "--run-timeout: expected a number of seconds > 0"),
        (["{def}", "--run-timeout", "60", "--workers", "0"], "--run-timeout 60 needs worker processes"),
    ],
)
def test_cli_bench_bad_input(tmp_path, data_root, capsys, args, message):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(_definition(data_root)))
    args = [a.format(**{"def": path, "tmp": tmp_path}) for a in args]
    argv = ["bench", *args, "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cli_report_without_records(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no bench records" in capsys.readouterr().err


# ---- dSprites -----------------------------------------------------------------------------------------------------
def test_dsprites_tasks_follow_the_factor_grid(tmp_path):
    root = tmp_path / "data"
    task = ensure_dsprites_task(root, "dsprites_ori", test_size=40)
    assert not list(root.glob(".*")), "no temporary folder left behind"
    lists = {s: (task / f"{s}.txt").read_text().splitlines() for s in ("train800", "val200", "train800val200", "test")}
    assert [len(v) for v in lists.values()] == [800, 200, 1000, 40]
    assert lists["train800val200"] == lists["train800"] + lists["val200"]
    assert not {x.split()[0] for x in lists["train800val200"]} & {x.split()[0] for x in lists["test"]}
    assert len((task / "classes.txt").read_text().splitlines()) == 16
    factors = {
        line.split()[0]: [int(v) for v in line.split()[1:]]
        for line in (task / "factors.txt").read_text().splitlines()
        if not line.startswith("#")
    }
    assert len(set(map(tuple, factors.values()))) == 1040, "distinct grid points"
    sizes = list(FACTOR_SIZES.values())
    for line in lists["train800val200"] + lists["test"]:
        path, label = line.split()
        f = factors[path]
        assert all(0 <= v < n for v, n in zip(f, sizes)) and int(label) == f[2] * 16 // 40
    img = np.asarray(Image.open(task / lists["test"][0].split()[0]))
    assert img.shape == (64, 64) and set(np.unique(img)) <= {0, 255} and img.max() == 255
    # deterministic: the first points are pinned (a changed sampler changes every published number)
    assert lists["train800"][:3] == [f"images/{i:05d}.png {lab}" for i, lab in enumerate(_PINNED_ORI)]
    assert ensure_dsprites_task(root, "dsprites_ori", test_size=40) == task, "present: not regenerated"
    (task / "test.txt").write_text("images/00000.png 0\n")
    with pytest.raises(DataError, match="not a complete dSprites export"):
        ensure_dsprites_task(root, "dsprites_ori", test_size=40)
    with pytest.raises(DataError, match="unknown dSprites task 'dsprites_scale'"):
        ensure_dsprites_task(root, "dsprites_scale")
    assert set(DSPRITES_TASKS) == {"dsprites_loc", "dsprites_ori"}


_PINNED_ORI = [9, 11, 8]  # orientation indices 24, 29, 21 of the first three grid points (seed 0 + 1)


def test_protocols_are_declared_by_task_types_and_found_by_name(data_root, request):
    """The bench names no protocol: an entry's protocol is looked up in vpeft.tasks.protocols and must be one its
    task type declares; a protocol and a task type registered outside the package plug in the same way."""
    from vpeft.tasks.base import TASKS
    from vpeft.tasks.classification import ClassificationTask
    from vpeft.tasks.protocols import PROTOCOLS, EvalProtocol

    def tasks(**entry):
        return [{"name": "tiny", "group": "natural", **entry}]

    with pytest.raises(ConfigError, match=r"tasks\[0\]\.protocol: unknown protocol 'base-to-novle'.*'base-to-novel'"):
        parse_definition(_definition(data_root, tasks=tasks(protocol="base-to-novle")))
    with pytest.raises(ConfigError, match="the base-to-novel protocol needs a task of kind zeroshot, got kind "
                       "'classification'"):  # fmt: skip
        parse_definition(_definition(data_root, tasks=tasks(protocol="base-to-novel", kind="classification")))
    d = parse_definition(_definition(data_root, tasks=tasks(protocol="base-to-novel"), methods=[{"name": "coop"}]))
    assert d.tasks[0].kind == "zeroshot" and d.runs()[0].task_options["classes"] == "base"

    class Twice(EvalProtocol):
        name = "toy-twice"

        def after_training(self, score, options, evaluate_on):
            return {"twice": 2 * score}

    class ToyTask(ClassificationTask):
        kind, protocols = "toy_kind", ("toy-twice",)

    PROTOCOLS.register("toy-twice", Twice())
    TASKS.register("toy_kind", ToyTask)
    request.addfinalizer(lambda: (PROTOCOLS.unregister("toy-twice"), TASKS.unregister("toy_kind")))
    d = parse_definition(_definition(data_root, tasks=tasks(protocol="toy-twice")))
    assert d.tasks[0].kind == "toy_kind"  # the one task type that declares it
    assert PROTOCOLS.get("toy-twice").after_training(0.25, {}, None) == {"twice": 0.5}
