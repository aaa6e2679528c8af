"""``vpeft tune``: search-space parsing, the protocol (test split read once, at the end), resumable and shared
studies, refusals, on a tiny random ViT and real digits (scikit-learn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna  # a test dependency: a missing one fails the suite, never skips it
import pytest

from vpeft.cli import main
from vpeft.data import ensure_digits_task
from vpeft.errors import ConfigError
from vpeft.tasks import ClassificationTask
from vpeft.train import TrainConfig
from vpeft.tune import TuneConfig, parse_space, run_tune

FAST = TrainConfig(epochs=2, batch_size=128, warmup_epochs=0.0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ensure_digits_task(root)
    return root


def _tune(data_root, out, trials=3, space=("lr=1e-3:3e-2:log", "r=2,4"), **kw):
    kw.setdefault("tune", TuneConfig(trials=trials, startup_trials=1))
    return run_tune(backbone="test_vit", method="lora", task="digits", space=parse_space("lora", list(space)),
                    out_dir=out, train_cfg=FAST, data_root=data_root, img_size=32, pretrained=False, **kw)  # fmt: skip


# ---- the search space ---------------------------------------------------------------------------------------------
def test_space_forms():
    s = parse_space("lora", ["lr=1e-4:1e-2:log", "weight_decay=0:1e-3", "r=4,8,16", "alpha=1:16:int",
                             "warmup_epochs=0:1:0.25", "targets=q,v"])  # fmt: skip
    by = {p.name: p for p in s.params}
    assert (by["lr"].kind, by["lr"].low, by["lr"].high, by["lr"].log) == ("float", 1e-4, 1e-2, True)
    assert (by["weight_decay"].kind, by["weight_decay"].log) == ("float", False)
    assert by["r"].choices == (4, 8, 16) and by["targets"].choices == ("q", "v")
    assert (by["alpha"].kind, by["alpha"].low, by["alpha"].high) == ("int", 1, 16)
    assert by["warmup_epochs"].step == 0.25
    train, method = s.split({"lr": 1e-3, "r": 8, "weight_decay": 0.0})
    assert train == {"lr": 1e-3, "weight_decay": 0.0} and method == {"r": 8}
    assert parse_space("lora", {"lr": "1e-4:1e-2:log", "r": [4, 8]}).describe() == ["lr=0.0001:0.01:log", "r=4,8"]


@pytest.mark.parametrize(
    "items, message",
    [
        (["rank=4,8"], "'rank' is neither a training hyper-parameter nor an option of lora; valid keys: .*alpha"),
        (["lr=0:1e-2:log"], "a log scale needs a positive low bound"),
        (["lr=1e-2:1e-3"], "low bound 0.01 must be below the high bound 0.001"),
        (["lr=1e-3:1e-2:cubic"], r"unknown range flag\(s\) \['cubic'\]"),
        (["lr"], "is not KEY=SPEC"),
        (["r=4,8", "r=16"], "names r more than once"),
        (["seed=0,1"], "'seed' is neither"),
        ([], "the search space is empty"),
    ],
)
def test_space_errors_name_the_value(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_space("lora", items)


def test_composition_keys_name_their_method():
    s = parse_space("lora+vpt_deep", ["lora.r=2,4", "vpt_deep.num_tokens=1,2", "lr=1e-3:1e-2"])
    assert [p.name for p in s.params] == ["lora.r", "vpt_deep.num_tokens", "lr"]
    with pytest.raises(ConfigError, match="'r' is neither"):
        parse_space("lora+vpt_deep", ["r=2,4"])


def test_invalid_bound_refused_before_training(data_root, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("vpeft.run.finetune", lambda *a, **kw: calls.append(kw))
    with pytest.raises(ConfigError, match=r"--space r=0,4: the value 0 is invalid"):
        _tune(data_root, tmp_path / "t", space=("r=0,4",))
    assert calls == []


# ---- the protocol -------------------------------------------------------------------------------------------------
def test_cli_tune_end_to_end_reads_test_once_at_the_end(data_root, tmp_path, capsys, monkeypatch):
    opened = []
    real = ClassificationTask.dataset

    def spy(self, root, split, *a, **kw):
        opened.append(split)
        return real(self, root, split, *a, **kw)

    monkeypatch.setattr(ClassificationTask, "dataset", spy)
    out = tmp_path / "study"
    argv = ["tune", "--backbone", "test_vit", "--no-pretrained", "--task", "digits", "--data-root", str(data_root),
            "--method", "lora", "--space", "lr=1e-3:3e-2:log", "--space", "r=2,4", "--trials", "3",
            "--startup-trials", "1", "--img-size", "32", "--epochs", "2", "--batch-size", "128",
            "--warmup-epochs", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("trial ") >= 3 and "val top1" in printed and "test top1" in printed
    # every trial read only train800 / val200; the test split was opened once, by the final run, last
    assert opened.count("test") == 1 and opened[-1] == "test" and opened[-2] == "train800val200"
    assert set(opened[:-2]) == {"train800", "val200"}
    res = json.loads((out / "tune_result.json").read_text())
    assert res["trials"]["complete"] + res["trials"]["pruned"] == 3
    best = next(h for h in res["history"] if h["number"] == res["best_trial"])
    assert best["state"] == "complete" and best["value"] == res["best_val"]
    assert res["best_val"] == max(h["value"] for h in res["history"] if h["state"] == "complete")
    final = json.loads((out / "final" / "result.json").read_text())
    assert final["train_split"] == "train800val200" and final["eval_split"] == "test"
    assert final["config"]["r"] == res["best_params"]["r"] and final["train"]["lr"] == res["best_params"]["lr"]
    assert res["score"] == final["score"] and res["cpu_s"] > res["search_cpu_s"] > 0
    assert "plots/history.html" in res["plots"] and (out / "plots" / "history.html").stat().st_size > 1000
    for h in res["history"]:  # every trial is a full run folder naming its run
        run = json.loads((out / "trials" / f"{h['number']:04d}" / "result.json").read_text())
        assert run["run"]["method"] == "lora" and run["eval_split"] == "val200"


def test_search_only_never_needs_the_test_split(data_root, tmp_path):
    root = tmp_path / "data"
    (root / "digits").mkdir(parents=True)
    for f in (data_root / "digits").iterdir():
        if f.name != "test.txt":
            (root / "digits" / f.name).symlink_to(f)
    res = _tune(root, tmp_path / "t", trials=2, tune=TuneConfig(trials=2, startup_trials=1, final=False))
    assert "score" not in res and res["trials"]["complete"] >= 1


def test_pruning_stops_trials_early(data_root, tmp_path):
    # the median pruner with no start-up trials: a trial below the running median at an epoch stops there
    # a good recipe first, then a hopeless one (lr 1e-7 barely moves the random head): pruned after epoch 1
    cfg = TuneConfig(trials=2, startup_trials=0, pruner="median", final=False)
    res = _tune(data_root, tmp_path / "t", tune=cfg, space=("lr=1e-7:1e-1:log",), enqueue=[{"lr": 0.03}, {"lr": 1e-7}])
    assert [h["params"]["lr"] for h in res["history"]] == [0.03, 1e-7]
    pruned = [h for h in res["history"] if h["state"] == "pruned"]
    assert [h["number"] for h in pruned] == [1], res["history"]
    for h in pruned:
        metrics = json.loads((tmp_path / "t" / "trials" / f"{h['number']:04d}" / "metrics.json").read_text())
        assert len(metrics["history"]) == h["pruned_at_epoch"] < FAST.epochs


# ---- resumable, shared, refused -------------------------------------------------------------------------------------
def test_resume_runs_only_the_missing_trials(data_root, tmp_path, monkeypatch):
    out = tmp_path / "t"
    cfg = TuneConfig(trials=2, startup_trials=1, pruner="none", final=False)
    first = _tune(data_root, out, tune=cfg)
    assert first["trials"]["complete"] == 2
    import vpeft.run

    calls = []
    real = vpeft.run.finetune
    monkeypatch.setattr(vpeft.run, "finetune", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    again = _tune(data_root, out, tune=cfg)  # the budget is spent: nothing trains
    assert calls == [] and again["history"] == first["history"]
    more = _tune(data_root, out, tune=dataclasses_replace(cfg, trials=3))  # one more trial, not three
    assert len(calls) == 1 and more["trials"]["complete"] == 3
    assert more["history"][:2] == first["history"]


def test_final_phase_has_one_writer(data_root, tmp_path):
    """Trials are shared between processes; the final run, plots and summary are written under the folder lock,
    which a second process waits for (here a real process holds it for 3 s)."""
    import time

    out = tmp_path / "t"
    cfg = TuneConfig(trials=1, startup_trials=1, pruner="none", final=False)
    first = _tune(data_root, out, tune=cfg)
    holder = subprocess.Popen([sys.executable, str(Path(__file__).with_name("lock_holder.py")), str(out),
                               "vpeft tune", "3"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    again = _tune(data_root, out, tune=cfg)  # nothing to train: it waits for the lock, then writes the summary
    waited = time.monotonic() - start
    assert holder.wait(timeout=60) == 0
    assert waited >= 2.0, f"wrote the summary while another process held the folder ({waited:.2f} s)"
    assert again["history"] == first["history"] and not (out / ".vpeft.lock").exists()


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_trial_of_a_killed_process_is_requeued(data_root, tmp_path):
    out = tmp_path / "t"
    cfg = TuneConfig(trials=1, startup_trials=1, pruner="none", final=False)
    _tune(data_root, out, tune=cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    study = optuna.load_study(study_name="lora-digits", storage=storage)
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True),
                        "r": optuna.distributions.CategoricalDistribution([2, 4])})  # fmt: skip
    orphan.set_user_attr("pid", dead.pid)
    import socket

    orphan.set_user_attr("host", socket.gethostname())
    res = _tune(data_root, out, tune=dataclasses_replace(cfg, trials=2))
    states = {h["number"]: h["state"] for h in res["history"]}
    assert states[orphan.number] == "fail"
    retry = [h for h in res["history"] if h["number"] > orphan.number]
    assert len(retry) == 1 and retry[0]["params"] == orphan.params and retry[0]["state"] == "complete"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"space": ("lr=1e-3:1e-2:log", "r=2,4")}, "space"),
        ({"tune": TuneConfig(trials=2, search_splits=("train800", "val200"), pruner="halving")}, "pruner"),
    ],
)
def test_changed_study_is_refused_naming_the_field(data_root, tmp_path, change, field):
    out = tmp_path / "t"
    _tune(data_root, out, trials=1, tune=TuneConfig(trials=1, startup_trials=1, final=False))
    with pytest.raises(ConfigError, match=rf"cannot continue under this one \({field}: "):
        _tune(data_root, out, **change)


def test_two_processes_share_one_study(data_root, tmp_path):
    out = tmp_path / "t"
    script = textwrap.dedent(f"""
        import sys
        from vpeft.train import TrainConfig
        from vpeft.tune import TuneConfig, parse_space, run_tune
        run_tune(backbone="test_vit", method="lora", task="digits", space=parse_space("lora", ["lr=1e-3:3e-2:log"]),
                 out_dir={str(out)!r}, train_cfg=TrainConfig(epochs=1, batch_size=128, warmup_epochs=0.0),
                 data_root={str(data_root)!r}, img_size=32, pretrained=False,
                 tune=TuneConfig(trials=4, startup_trials=1, pruner="none", final=False))
    """)
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = optuna.load_study(study_name="lora-digits", storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(done) <= 5  # each process stops once 4 are finished (one may be running at that moment)
    assert len({t.user_attrs["pid"] for t in done}) == 2  # both processes contributed trials


# ---- in vpeft bench: a tune block per method, beside fixed recipes in the leaderboard -------------------------------
def test_bench_tune_block_selects_on_val_and_reports_beside_fixed(data_root, tmp_path):
    from vpeft.bench import parse_definition, run_bench, write_report
    from vpeft.bench.records import read_record, record_path

    methods = [
        {"name": "lora", "settings": {"r": 2}},
        {"name": "lora", "label": "lora_tuned", "settings": {"r": 2},
         "tune": {"trials": 2, "startup_trials": 1, "pruner": "none", "space": {"lr": "1e-3:3e-2:log", "r": [2, 4]}}},
    ]  # fmt: skip
    d = parse_definition({
        "name": "t", "backbone": "test_vit", "img_size": 32, "pretrained": False, "seeds": [0],
        "data_root": str(data_root), "train": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0},
        "latency": {"batch_size": 2, "warmup": 0, "repeats": 1}, "tasks": [{"name": "digits", "group": "natural"}],
        "methods": methods,
    })  # fmt: skip
    out = tmp_path / "bench"
    assert run_bench(d, out, workers=0, progress=False).ok == 2
    rec = read_record(record_path(out, "lora_tuned", "digits", 0))
    sel = rec["selection"]
    assert sel["kind"] == "tune" and sel["trials"]["complete"] == 2 and sel["cpu_s"] > 0
    assert rec["resolved"]["method_config"]["r"] == sel["chosen"]["method"]["r"]
    assert rec["resolved"]["train"]["lr"] == sel["chosen"]["train"]["lr"]
    assert rec["resolved"]["train_split"] == "train800val200"
    md = write_report(out)[0]
    assert "Recipe selection" in md
    assert "| LoRA (r=2) [lora] | fixed | - |" in md and "| LoRA (r=2) [lora_tuned] | tuned (Optuna) | 2 |" in md
    link = "runs/lora_tuned/digits/seed0/tune/plots/history.html"
    assert f"[history]({link})" in md and (out / link).is_file()
    assert f'href="{link}"' in (out / "leaderboard.html").read_text()


def test_bench_tune_block_is_checked_on_load():
    from vpeft.bench import parse_definition

    base = {"name": "t", "backbone": "test_vit", "tasks": [{"name": "digits", "group": "natural"}]}
    bad = {"name": "lora", "tune": {"trials": 2, "space": {"rank": [2, 4]}}}
    with pytest.raises(ConfigError, match="'rank' is neither a training hyper-parameter nor an option of lora"):
        parse_definition({**base, "methods": [bad]})
    both = {"name": "lora", "grid": {"lr": [1e-3, 1e-2]}, "tune": {"space": {"r": [2, 4]}}}
    with pytest.raises(ConfigError, match="either a grid or a tune block"):
        parse_definition({**base, "methods": [both]})


def test_tune_on_a_segmentation_task_scores_miou(tmp_path):
    from test_segmentation import _make_folder

    _make_folder(tmp_path / "data" / "toy", n={"train": 3, "val": 2, "trainval": 5, "test": 2})
    res = run_tune(backbone="test_vit", method="lora", task="toy", space=parse_space("lora", ["lr=1e-3:1e-1:log"]),
                   out_dir=tmp_path / "t", train_cfg=TrainConfig(epochs=2, batch_size=4, warmup_epochs=0.0),
                   data_root=tmp_path / "data", img_size=32, pretrained=False,
                   tune=TuneConfig(trials=2, startup_trials=1, search_splits=("train", "val"),
                                   final_splits=("trainval", "test")))  # fmt: skip
    assert res["metric"] == "miou" and res["primary_metric"] == "miou"
    trial = json.loads((tmp_path / "t" / "trials" / "0000" / "metrics.json").read_text())
    assert all(h["val_miou"] is not None for h in trial["history"])  # pruning saw the per-epoch val mIoU
    assert res["test"]["miou"] == res["score"]
