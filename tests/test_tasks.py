"""The task slot: a TaskModel (backbone + decoder outside it) through apply / train / save / load / merge, and the
classification task's folder handling. The segmentation and vision-language tasks have their own test files."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_BACKBONES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vpeft
from vpeft.api import read_delta
from vpeft.errors import CheckpointError, ConfigError
from vpeft.state import state_of
from vpeft.tasks import ClassificationTask, Meter, Task, TaskModel, register_task, task_for_folder, task_from_dict
from vpeft.train import TrainConfig, evaluate, train


class _MSEMeter(Meter):
    def __init__(self) -> None:
        self.total = torch.zeros(2, dtype=torch.float64)

    def update(self, loss, output, target) -> None:
        self.total += torch.tensor([float(loss) * len(target), len(target)], dtype=torch.float64)

    def sums(self) -> torch.Tensor:
        return self.total.clone()

    def load_sums(self, sums: torch.Tensor) -> None:
        self.total = sums.clone()

    def compute(self) -> dict[str, Any]:
        return {
            "loss": float(self.total[0] / self.total[1]),
            "mse": float(self.total[0] / self.total[1]),
            "n": int(self.total[1]),
        }


class _Regressor(TaskModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone.forward_features(x)[:, 0])


@register_task
class ToyRegression(Task):
    """A toy task type defined entirely outside the package: the engine, save/load and merge need no edit."""

    kind: ClassVar[str] = "toy_regression"
    primary_metric: ClassVar[str] = "mse"

    def __init__(self, outputs: int = 3) -> None:
        self.outputs = outputs

    @classmethod
    def from_folder(cls, path, **options):
        return cls(**options)

    def dataset(self, path, split, model, *, input_size=None, train=False):
        raise NotImplementedError  # not used by these tests

    def backbone_classes(self) -> int:
        return 0

    def build(self, backbone: nn.Module) -> nn.Module:
        width = backbone.num_features
        return _Regressor(
            backbone, nn.Sequential(nn.Linear(width, 8), nn.BatchNorm1d(8), nn.Linear(8, self.outputs)), self
        )

    def loss(self, output, target, *, label_smoothing: float = 0.0) -> torch.Tensor:
        return F.mse_loss(output.float(), target)

    def new_meter(self) -> Meter:
        return _MSEMeter()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "outputs": self.outputs}


def _backbone() -> nn.Module:
    factory, _ = TINY_BACKBONES["vit_cls"]
    model = factory()
    model.reset_classifier(0)
    return model


def _data(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, generator=g)), batch_size=8
    )


@pytest.mark.parametrize("method", ["lora", "vpt_deep", "bitfit", "linear"])
def test_task_model_trains_saves_loads_and_merges(tmp_path, method):
    task = ToyRegression()
    model = task.build(_backbone())
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    rep = vpeft.apply(model, method)
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    assert rep.decoder == decoder_params and rep.head == 0
    assert rep.method_params == rep.trainable - decoder_params
    assert all(p.requires_grad for p in model.decoder.parameters())
    result = train(model, _data(), TrainConfig(epochs=2, lr=1e-2, batch_size=8), progress=False)
    assert "train_mse" in result.final and result.final["val_mse"] is None
    for k, v in model.backbone.state_dict().items():  # base weights untouched (wrapped names carry base_layer)
        base = k.replace(".base_layer", "")
        if base in frozen and "lora" not in k and not k.endswith("prompts"):
            if method != "bitfit" or not k.endswith("bias"):
                assert torch.equal(v, frozen[base]), k
    path = vpeft.save(model, tmp_path / "delta.safetensors")
    meta, tensors = read_delta(path)
    assert json.loads(meta["task"]) == {"kind": "toy_regression", "outputs": 3}
    assert any(k.startswith("decoder.") for k in tensors)  # the decoder, outside the backbone, is in the delta
    assert "decoder.1.running_mean" in tensors  # with its BatchNorm statistics
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fresh = task_from_dict(json.loads(meta["task"])).build(_backbone())
    vpeft.load(fresh, path)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
        if vpeft.get_method(method).mergeable:
            vpeft.merge(fresh)
            assert torch.allclose(fresh(x), expected, atol=1e-5)
            assert isinstance(fresh.decoder, nn.Sequential)  # merge keeps the decoder
    metrics = evaluate(model, _data(8))
    assert set(metrics) == {"loss", "mse", "n"} and metrics["n"] == 8


def test_deltas_load_only_for_their_task_kind(tmp_path):
    task = ToyRegression()
    model = task.build(_backbone())
    vpeft.apply(model, "lora")
    path = vpeft.save(model, tmp_path / "toy.safetensors")
    with pytest.raises(CheckpointError, match="'toy_regression' task; this model is a 'classification'"):
        vpeft.load(_backbone(), path)
    factory, _ = TINY_BACKBONES["vit_cls"]
    clf = factory()
    vpeft.apply(clf, "lora")
    clf_path = vpeft.save(clf, tmp_path / "clf.safetensors")
    with pytest.raises(CheckpointError, match="'classification' task; this model is a 'toy_regression'"):
        vpeft.load(task.build(_backbone()), clf_path)


def test_state_is_public_and_knows_the_decoder():
    model = ToyRegression().build(_backbone())
    vpeft.apply(model, "lora")
    state = state_of(model)
    assert state.prefix == "backbone." and state.task["kind"] == "toy_regression"
    assert set(state.decoder) == {f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
    assert all(n.startswith(("backbone.", "decoder.")) for n in state.trainable)


def test_task_registry_errors():
    with pytest.raises(ConfigError, match="unknown task kind 'segmentatoin'"):
        task_from_dict({"kind": "segmentatoin"})
    with pytest.raises(ConfigError, match="classification tasks take no task options"):
        ClassificationTask.from_folder(__import__("pathlib").Path("."), decoder="fpn")


def test_classification_folder_detection(tmp_path):
    from vpeft.data import ensure_digits_task

    ensure_digits_task(tmp_path)
    task = task_for_folder(tmp_path / "digits")
    assert isinstance(task, ClassificationTask) and task.num_classes == 10
    assert task.describe() == "classification, 10 classes"
    with pytest.raises(
        vpeft.DataError, match=r"no split 'train9'.*splits there: train800, val200, train800val200, test$"
    ):
        task.dataset(tmp_path / "digits", "train9", _backbone())
