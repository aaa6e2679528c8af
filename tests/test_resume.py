"""Resume after a crash: a killed run continues from its last complete checkpoint to the same final result.

Real processes are killed with SIGKILL (after a checkpoint, and in the middle of writing one); the resumed run's
delta tensors and metrics must equal an uninterrupted run's bit for bit (CPU, fixed seed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_BACKBONES
from torch.utils.data import DataLoader, TensorDataset

import vpeft
from vpeft.data import ensure_digits_task
from vpeft.errors import CheckpointError, ConfigError
from vpeft.train import TrainConfig, train
from vpeft.train.checkpoint import CHECKPOINT_NAME, ResumeMismatchError

SRC = Path(__file__).resolve().parents[1] / "src"


# ---- in process: a crash after an epoch, then resume ------------------------------------------------------------
def _model(method: str = "lora"):
    factory, _ = TINY_BACKBONES["vit_cls"]
    model = factory()
    torch.manual_seed(1)
    vpeft.apply(model, method)
    return model


def _loader():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 5, (24,), generator=g))
    return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))


class _Crash(Exception):
    pass


def _crash_after(epoch: int):
    def callback(record):
        if record["epoch"] == epoch:
            raise _Crash

    return callback


@pytest.mark.parametrize("method", ["lora", "vpt_deep", "full"])
def test_resumed_training_is_bit_identical(tmp_path, method):
    cfg = TrainConfig(epochs=4, lr=1e-2, batch_size=8, warmup_epochs=1.0)
    ref = _model(method)
    ref.train()  # dropout-free tiny ViT; the loop sets train mode anyway
    ref_result = train(ref, _loader(), cfg, out_dir=tmp_path / "ref", progress=False)
    model = _model(method)
    with pytest.raises(_Crash):
        train(model, _loader(), cfg, out_dir=tmp_path / "run", progress=False, callbacks=[_crash_after(2)])
    fresh = _model(method)  # a new process would rebuild the run from scratch
    result = train(fresh, _loader(), cfg, out_dir=tmp_path / "run", progress=False, resume=True)
    # it resumed (a deterministic re-run from scratch would end with the same tensors): epochs 3 and 4 ran here
    per_epoch = ref_result.steps // cfg.epochs
    assert (result.resumed_after, result.epochs_run, result.steps_run) == (2, [3, 4], 2 * per_epoch)
    assert ref_result.epochs_run == [1, 2, 3, 4] and ref_result.resumed_after is None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["resumes"] == [{"after_epoch": 2, "step": 2 * per_epoch}]
    strip = [{k: v for k, v in r.items() if "time" not in k and k != "images_per_s"} for r in ref_result.history]
    got = [{k: v for k, v in r.items() if "time" not in k and k != "images_per_s"} for r in result.history]
    assert got == strip and result.steps == ref_result.steps
    for (n, a), (_, b) in zip(ref.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_resume_refuses_another_config_and_another_model(tmp_path):
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=8)
    train(_model(), _loader(), cfg, out_dir=tmp_path, progress=False)
    differs = r"run differs from the checkpointed one \(train.lr: checkpoint 0.01, now 0.001\)"
    with pytest.raises(ResumeMismatchError, match=differs) as info:
        train(_model(), _loader(), TrainConfig(epochs=2, lr=1e-3, batch_size=8), out_dir=tmp_path, resume=True)
    assert isinstance(info.value, ConfigError)  # the CLI's exit status 2
    with pytest.raises(CheckpointError, match="belongs to another model"):
        train(_model("bitfit"), _loader(), cfg, out_dir=tmp_path, progress=False, resume=True)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(_model(), _loader(), cfg, out_dir=tmp_path, progress=False, resume=True)


def test_resume_refuses_changed_epochs(tmp_path):
    """The warm-up + cosine schedule is planned for the run's epochs: more or fewer on resume is refused."""
    model = _model()
    with pytest.raises(_Crash):
        train(model, _loader(), TrainConfig(epochs=3, batch_size=8), out_dir=tmp_path, progress=False,
              callbacks=[_crash_after(2)])  # fmt: skip
    with pytest.raises(ResumeMismatchError, match="schedule .* was planned for 3 epochs and --epochs 4 would re-plan"):
        train(_model(), _loader(), TrainConfig(epochs=4, batch_size=8), out_dir=tmp_path, progress=False, resume=True)
    with pytest.raises(ResumeMismatchError, match="already trained 2 epochs, more than --epochs 1"):
        train(_model(), _loader(), TrainConfig(epochs=1, batch_size=8), out_dir=tmp_path, progress=False, resume=True)
    result = train(
        _model(), _loader(), TrainConfig(epochs=3, batch_size=8), out_dir=tmp_path, progress=False, resume=True
    )
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.epochs_run == [3]


# ---- the CLI: vpeft train --resume continues the same run, and refuses another one ----------------------------------
def _cli_train(data_root, out, *extra):
    from vpeft.cli import main

    argv = [
        "train", "--backbone", "test_vit", "--no-pretrained", "--task", "digits", "--data-root", str(data_root),
        "--img-size", "32", "--epochs", "3", "--batch-size", "50", "--train-split", "val200",
        "--eval-split", "val200", "--method", "lora", "--opt", "r=4", "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip
    return main(argv)


def test_cli_resume_continues_the_run_and_refuses_another(tmp_path, monkeypatch, capsys):
    import shutil

    import vpeft.train.engine as engine

    ensure_digits_task(tmp_path / "data")
    out = tmp_path / "run"
    ran: list[int] = []
    real_run_epoch = engine._Loop.run_epoch

    def counting_run_epoch(self, loader, epoch, progress):
        ran.append(epoch)
        if crash_after and epoch > crash_after:
            raise _Crash
        return real_run_epoch(self, loader, epoch, progress)

    monkeypatch.setattr(engine._Loop, "run_epoch", counting_run_epoch)
    crash_after = 2
    with pytest.raises(_Crash):  # killed during epoch 3, after epoch 2's checkpoint
        _cli_train(tmp_path / "data", out)
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["epoch"] == 2
    crash_after, ran[:] = 0, []

    def refused(*extra, data=tmp_path / "data"):
        capsys.readouterr()
        assert _cli_train(data, out, "--resume", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("vpeft train: error: cannot resume"), err
        return err

    err = refused("--opt", "r=8", "--lr", "0.01", "--img-size", "48")
    for field in ("run.method.r: checkpoint 4, now 8", "train.lr: checkpoint 0.001, now 0.01",
                  "run.img_size: checkpoint 32, now 48"):  # fmt: skip
        assert field in err, err
    assert "planned for 3 epochs and --epochs 4" in refused("--epochs", "4")
    assert "already trained 2 epochs, more than --epochs 1" in refused("--epochs", "1")
    assert "run.splits.train: checkpoint 'val200', now 'train800'" in refused("--train-split", "train800")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "data", edited)
    lines = (edited / "digits" / "val200.txt").read_text().splitlines()
    (edited / "digits" / "val200.txt").write_text("\n".join(lines[:-1]) + "\n")
    err = refused(data=edited)
    assert "run.task_lists_sha256: checkpoint" in err and "run.task_folder: checkpoint" in err, err
    assert ran == [] and (out / CHECKPOINT_NAME).is_file()  # refusals train nothing and keep the checkpoint

    assert _cli_train(tmp_path / "data", out, "--resume") == 0
    assert ran == [3], "the resumed run trains only the epoch after its checkpoint"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2, 3] and metrics["resumes"][0]["after_epoch"] == 2
    assert (out / "result.json").is_file() and not (out / CHECKPOINT_NAME).exists()

    finished = (out / "result.json").read_bytes()
    capsys.readouterr()
    assert _cli_train(tmp_path / "data", out, "--resume") == 2  # a finished run is not retrained and replaced
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a finished run" in err and "--overwrite" in err, err
    assert ran == [3] and (out / "result.json").read_bytes() == finished


# ---- real processes killed with SIGKILL --------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    sys.path.insert(0, {src!r})
    from vpeft.run import finetune
    from vpeft.train import TrainConfig
    import vpeft.train.checkpoint as ckpt

    stall_epoch = int(os.environ.get("STALL_AT_EPOCH", "0"))
    real_save = torch.save

    def slow_save(obj, f, *a, **k):  # fault injection: stall in the middle of writing one checkpoint
        if stall_epoch and isinstance(obj, dict) and obj.get("epoch") == stall_epoch:
            f.write(b"PK half a checkpoint")
            f.flush()
            open(os.environ["MARKER"], "w").close()
            time.sleep(600)
        return real_save(obj, f, *a, **k)

    torch.save = slow_save
    finetune(backbone="test_vit", method="lora", task="digits", data_root={data!r},
             train_cfg=TrainConfig(epochs=4, lr=2e-3, batch_size=50, warmup_epochs=1.0),
             img_size=32, train_split="val200", eval_split="val200", out_dir=sys.argv[1], pretrained=False,
             progress=False, resume=len(sys.argv) > 2)
    """
)


def _spawn(script: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, str(script), str(out), *extra], env=env)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the child never reached the kill point")
        time.sleep(0.05)


def _epochs_done(out: Path) -> int:
    try:
        return len(json.loads((out / "metrics.json").read_text())["history"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    ensure_digits_task(root / "data")
    script = root / "child.py"
    script.write_text(CHILD.format(src=str(SRC), data=str(root / "data")))
    ref = root / "ref"
    assert _spawn(script, ref).wait(timeout=600) == 0
    return script, ref


def _same_run(a: Path, b: Path) -> None:
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert ra["metrics"] == rb["metrics"] and ra["final_train_top1"] == rb["final_train_top1"]
    ta, tb = load_file(a / "delta.safetensors"), load_file(b / "delta.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not (b / CHECKPOINT_NAME).exists()  # a complete run keeps no checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 3])
def test_sigkill_after_an_epoch_then_resume(child, tmp_path, kill_after):
    script, ref = child
    out = tmp_path / "run"
    proc = _spawn(script, out)
    _wait_for(lambda: _epochs_done(out) >= kill_after and (out / CHECKPOINT_NAME).exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _spawn(script, out, "--resume").wait(timeout=600) == 0
    _same_run(ref, out)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(child, tmp_path):
    script, ref = child
    out, marker = tmp_path / "run", tmp_path / "stalled"
    proc = _spawn(script, out, env={"STALL_AT_EPOCH": "2", "MARKER": str(marker)})
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out.glob(f".{CHECKPOINT_NAME}.*.tmp"))  # the half-written file never took the checkpoint's name
    saved = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 1  # the previous complete checkpoint is intact
    assert _spawn(script, out, "--resume").wait(timeout=600) == 0
    assert not list(out.glob(f".{CHECKPOINT_NAME}.*.tmp"))  # stale temporary files are cleaned up
    _same_run(ref, out)


# ---- vpeft bench: the driver killed during a run's final training, then the bench re-run --------------------------
BENCH_DRIVER = textwrap.dedent(
    """
    import io, json, sys
    sys.path[:0] = [{src!r}, {tests!r}]
    from vpeft.bench import parse_definition
    from vpeft.bench.runner import Progress, _run_pool
    from bench_worker import stall_after_checkpoint
    if __name__ == "__main__":  # workers are spawned
        d = parse_definition(json.loads({definition!r}))
        _run_pool(d.runs(), sys.argv[1], 1, 1, Progress(1, 1, io.StringIO()), False, target=stall_after_checkpoint)
    """
)


@pytest.mark.slow
def test_bench_driver_killed_mid_training_then_rerun_gives_the_same_record(tmp_path, request):
    from vpeft.bench import parse_definition, run_bench

    ensure_digits_task(tmp_path / "data")
    definition = {
        "name": "resume", "backbone": "test_vit", "img_size": 32, "pretrained": False, "seeds": [0],
        "data_root": str(tmp_path / "data"),
        "train": {"epochs": 4, "batch_size": 50, "warmup_epochs": 1, "lr": 2e-3},
        "latency": {"batch_size": 1, "warmup": 0, "repeats": 1},
        "tasks": [{"name": "digits", "group": "natural"}],
        "methods": [{"name": "lora"}],
    }  # fmt: skip
    # Bit-equality holds at one thread count: the driver's worker runs with 1 torch thread, so do the in-process
    # runs here (CI's 2 threads reduce in another order and differ in the last bits).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    ref = run_bench(parse_definition(definition), tmp_path / "ref", workers=0, progress=False)
    assert ref.ok == 1
    out, marker = tmp_path / "out", tmp_path / "stalled"
    script = tmp_path / "driver.py"
    script.write_text(
        BENCH_DRIVER.format(src=str(SRC), tests=str(Path(__file__).parent), definition=json.dumps(definition))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_AT_EPOCH": "2", "STALL_MARKER": str(marker)}
    driver = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    _wait_for(marker.exists, driver)
    driver.send_signal(signal.SIGKILL)  # the worker's watchdog takes the worker down with it
    driver.wait()
    run_dir = out / "runs" / "lora" / "digits" / "seed0"
    assert torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["epoch"] == 2
    assert not (run_dir / "record.json").exists()
    again = run_bench(parse_definition(definition), out, workers=0, progress=False)
    assert again.ok == 1
    a = json.loads((tmp_path / "ref" / "runs" / "lora" / "digits" / "seed0" / "record.json").read_text())
    b = json.loads((run_dir / "record.json").read_text())
    assert a["top1"] == b["top1"] and a["test_loss"] == b["test_loss"] and a["test_n"] == b["test_n"]
    ta, tb = (
        load_file(tmp_path / "ref" / "runs" / "lora" / "digits" / "seed0" / "delta.safetensors"),
        load_file(run_dir / "delta.safetensors"),
    )
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
