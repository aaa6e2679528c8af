"""Tests of vpeft.train: config, optimizer, schedule, the training loop and evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from tiny import TINY_BACKBONES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vpeft
from vpeft.errors import ConfigError, DataError
from vpeft.train import (
    TrainConfig,
    build_optimizer,
    build_scheduler,
    evaluate,
    mark_no_decay,
    set_seed,
    train,
)


def _blobs(n: int = 96, dim: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Linearly separable Gaussian blobs."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


def _mlp(dim: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, classes))


def _loader(ds: TensorDataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config


def test_config_round_trip() -> None:
    cfg = TrainConfig(epochs=3, lr=5e-4, warmup_epochs=0.5, max_grad_norm=1, bf16=True, label_smoothing=0.1)
    assert isinstance(cfg.max_grad_norm, float)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert TrainConfig.from_dict({}) == TrainConfig()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"warmup_epochs": 20.0}, "warmup_epochs"),
        ({"batch_size": True}, "batch_size"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"bf16": "yes"}, "bf16"),
        ({"seed": -1}, "seed"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"log_every": -1}, "log_every"),
    ],
)
def test_config_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=rf"TrainConfig\.{needle} must be .*got {kwargs[needle]!r}"):
        TrainConfig(**kwargs)


def test_config_unknown_key() -> None:
    with pytest.raises(ConfigError, match="'epoch'.*Valid TrainConfig keys: .*epochs"):
        TrainConfig.from_dict({"epoch": 3})


# --------------------------------------------------------------------------- optimizer and schedule


def test_optimizer_only_trainable_and_decay_groups() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    prompt = mark_no_decay(nn.Parameter(torch.zeros(4, 16)))
    model.register_parameter("prompt", prompt)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05))
    groups = {g["name"]: g for g in opt.param_groups}
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    assert decay_ids == {id(model[3].weight)}
    assert no_decay_ids == {id(model[1].weight), id(model[1].bias), id(model[3].bias), id(prompt)}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0

    frozen_before = [p.detach().clone() for p in model[0].parameters()]
    trained_before = model[3].weight.detach().clone()
    train(model, _loader(_blobs(16), 8), TrainConfig(epochs=1, batch_size=8), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model[0].parameters(), frozen_before))
    assert not torch.equal(model[3].weight, trained_before)


def test_frozen_params_get_no_state_and_do_not_change() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    before = model[0].weight.detach().clone()
    ds = _blobs(16)
    cfg = TrainConfig(epochs=1, batch_size=8, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    loss = nn.functional.cross_entropy(model(ds.tensors[0]), ds.tensors[1])
    loss.backward()
    opt.step()
    assert model[0].weight not in opt.state and model[0].bias not in opt.state
    assert model[3].weight in opt.state
    assert torch.equal(model[0].weight, before)


def test_no_trainable_parameters() -> None:
    model = _mlp().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())


def test_scheduler_warmup_then_cosine() -> None:
    cfg = TrainConfig(epochs=3, lr=1.0, warmup_epochs=1, min_lr=0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    final = opt.param_groups[0]["lr"]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lrs[15] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert final == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_scheduler_without_warmup_starts_at_peak() -> None:
    cfg = TrainConfig(epochs=2, lr=0.5, warmup_epochs=0)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    build_scheduler(opt, cfg, steps_per_epoch=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        build_scheduler(opt, cfg, steps_per_epoch=0)


# --------------------------------------------------------------------------- training loop


def test_vit_learns_separable_task(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    set_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=3,
        pretrained=False,
    )
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 3, 16, 16, generator=g) * 0.3
    x[torch.arange(60), y] += 1.0  # the class is the brightest channel
    ds = TensorDataset(x, y)
    cfg = TrainConfig(epochs=3, lr=3e-3, warmup_epochs=1, batch_size=20, label_smoothing=0.1, max_grad_norm=1.0)
    result = train(
        model, _loader(ds, 20, shuffle=True), cfg, val_loader=_loader(ds, 60), progress=False, out_dir=tmp_path
    )
    assert result.final["train_top1"] > 0.9
    assert result.final["val_top1"] > 0.9
    assert result.history[0]["train_loss"] > result.final["train_loss"]
    assert result.steps == 3 * 3

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["complete"] is True and saved["steps"] == 9
    assert TrainConfig.from_dict(saved["config"]) == cfg
    assert [r["epoch"] for r in saved["history"]] == list(range(1, 4))
    keys = {"epoch", "train_loss", "train_top1", "lr", "val_top1", "val_loss", "epoch_time_s", "images_per_s"}
    assert keys <= set(saved["history"][-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.json"]  # no temp files left


def test_grad_accum_matches_large_batch() -> None:
    ds = _blobs(32)
    cfg1 = TrainConfig(epochs=2, batch_size=8, grad_accum=1, warmup_epochs=0.5, weight_decay=0.01)
    cfg2 = TrainConfig(epochs=2, batch_size=4, grad_accum=2, warmup_epochs=0.5, weight_decay=0.01)
    big, small = _mlp(), _mlp()
    r1 = train(big, _loader(ds, 8), cfg1, progress=False)
    r2 = train(small, _loader(ds, 4), cfg2, progress=False)
    assert r1.steps == r2.steps == 8
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert r1.final["train_loss"] == pytest.approx(r2.final["train_loss"], rel=1e-5)


def test_grad_accum_steps_on_partial_group() -> None:
    result = train(_mlp(), _loader(_blobs(40), 8), TrainConfig(epochs=2, batch_size=8, grad_accum=2), progress=False)
    assert result.steps == 2 * 3  # 5 micro-batches -> groups of 2, 2, 1


def test_seeded_runs_are_bit_identical() -> None:
    def run() -> tuple[list[torch.Tensor], list[dict]]:
        set_seed(1)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 3))
        result = train(
            model, _loader(_blobs(48), 8, shuffle=True, seed=1), TrainConfig(epochs=2, seed=1), progress=False
        )
        return [p.detach().clone() for p in model.parameters()], result.history

    params_a, hist_a = run()
    params_b, hist_b = run()
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]


def test_bf16_autocast_runs() -> None:
    result = train(_mlp(), _loader(_blobs(32), 8), TrainConfig(epochs=1, bf16=True), progress=False)
    assert math.isfinite(result.final["train_loss"])


def test_callback_can_stop_and_metrics_written(tmp_path: Path) -> None:
    seen: list[int] = []

    def stop_after_two(record: dict) -> bool:
        seen.append(record["epoch"])
        return record["epoch"] == 2

    result = train(
        _mlp(),
        _loader(_blobs(16), 8),
        TrainConfig(epochs=5),
        out_dir=tmp_path / "run",
        progress=False,
        callbacks=[stop_after_two],
    )
    assert seen == [1, 2] and result.stopped_early and len(result.history) == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(saved["history"]) == 2 and saved["complete"] is True
    assert saved["history"][0]["val_top1"] is None


def test_nan_loss_raises() -> None:
    model = _mlp()
    with torch.no_grad():
        model[3].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="epoch 1"):
        train(model, _loader(_blobs(16), 8), TrainConfig(epochs=1), progress=False)


def test_empty_loader() -> None:
    empty = DataLoader(_blobs(4), batch_size=8, drop_last=True)
    with pytest.raises(DataError, match="no batches"):
        train(_mlp(), empty, TrainConfig(epochs=1), progress=False)


# --------------------------------------------------------------------------- evaluation


def test_evaluate_restores_mode_and_reports_fraction() -> None:
    model = _mlp()
    model.train()
    ds = _blobs(30)
    stats = evaluate(model, _loader(ds, 7))
    assert model.training
    assert stats["n"] == 30 and 0.0 <= stats["top1"] <= 1.0
    with torch.no_grad():
        logits = model.eval()(ds.tensors[0])
    assert stats["top1"] == pytest.approx((logits.argmax(1) == ds.tensors[1]).float().mean().item())
    assert stats["loss"] == pytest.approx(nn.functional.cross_entropy(logits, ds.tensors[1]).item(), rel=1e-5)
    model.eval()
    evaluate(model, _loader(ds, 7))
    assert not model.training


def test_evaluate_empty_loader() -> None:
    with pytest.raises(DataError, match="no samples"):
        evaluate(_mlp(), [])


# ---- step options: channels-last, gradient checkpointing, torch.compile ----------------------------------------
def _images(n: int = 16, size: int = 32, classes: int = 5) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))
    return DataLoader(ds, batch_size=8)


def _tiny(name: str, method: str) -> nn.Module:
    model = TINY_BACKBONES[name][0]()
    vpeft.apply(model, method)
    return model


@pytest.mark.parametrize("name,method,auto", [("cnn_effnet", "bitfit", True), ("vit_cls", "lora", False)])
def test_channels_last_is_automatic_for_cnns_and_changes_no_result(name, method, auto):
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=8, warmup_epochs=0)
    runs = {}
    for option in (None, not auto):
        model = _tiny(name, method)
        history = train(model, _images(), dataclasses.replace(cfg, channels_last=option), progress=False).history
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
        nhwc = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert nhwc == (auto if option is None else option)
        runs[option] = history[0]["train_loss"]
    assert runs[None] == pytest.approx(runs[not auto], rel=1e-4, abs=1e-5)


def test_grad_checkpointing_gives_the_same_training():
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=8, warmup_epochs=0)
    got = []
    for ckpt in (False, True):
        model = _tiny("vit_cls", "lora")
        history = train(model, _images(), dataclasses.replace(cfg, grad_checkpointing=ckpt), progress=False).history
        assert model.grad_checkpointing is ckpt
        got.append((history[0]["train_loss"], [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    assert got[0][0] == pytest.approx(got[1][0], rel=1e-5)
    for a, b in zip(got[0][1], got[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_on_a_model_without_it_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs a backbone of a known family .*timm_vit.*; Sequential is none"):
        train(_mlp(), _loader(_blobs(), 32), TrainConfig(epochs=1, grad_checkpointing=True), progress=False)


@pytest.mark.parametrize("bad", [{"compile": 1}, {"channels_last": "yes"}, {"grad_checkpointing": None}])
def test_step_options_validated(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig(**bad)


@pytest.mark.slow
def test_compile_trains_the_same_model():
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=32, warmup_epochs=0)
    eager = train(_mlp(), _loader(_blobs(), 32), cfg, progress=False).history
    compiled = train(_mlp(), _loader(_blobs(), 32), dataclasses.replace(cfg, compile=True), progress=False).history
    for a, b in zip(eager, compiled):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_a_run_request_describes_a_run_once():
    """RunRequest holds finetune's parameter list once: finetune(request) == finetune(**fields); replace() derives
    runs from it and refuses unknown fields by name."""
    import dataclasses

    from vpeft.run import RunRequest, finetune

    req = RunRequest(backbone="test_vit", method="lora", task="digits")
    assert req.replace(train_split="train800").train_split == "train800" and req.train_split == "train800val200"
    with pytest.raises(TypeError, match=r"unknown run field\(s\) 'epochs'; valid: backbone, method, task"):
        req.replace(epochs=3)
    with pytest.raises(TypeError, match="unknown run field"):
        finetune(backbone="test_vit", method="lora", task="digits", img_sise=32)
    import inspect

    params = [p for p in inspect.signature(finetune).parameters if p not in ("request", "callbacks", "fields")]
    assert params == [], "finetune takes a RunRequest (or its fields): its own signature lists no run fields"
    assert {f.name for f in dataclasses.fields(RunRequest)} >= {"backbone", "method", "task", "train_cfg", "resume"}
