"""TrainConfig.memory="recompute" (every block recomputed in backward) and "half" (the first 2/3 of them):
bit-identical results, names unchanged."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import timm
import torch
from saved_memory import saved_step
from tiny import NUM_CLASSES, TINY_BACKBONES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vpeft
from vpeft.arch import get_family
from vpeft.arch.recompute import (
    HALF,
    is_recomputed,
    leading_blocks,
    recompute_blocks,
    recomputed_names,
    stop_recompute,
)
from vpeft.errors import ConfigError
from vpeft.train import TrainConfig, train


def _vit(drop_path: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        mlp_ratio=2,
        num_classes=NUM_CLASSES,
        drop_path_rate=drop_path,
    )


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, the trainable tensors' gradients and the bytes of the distinct storages autograd saved."""
    x, y = _batch()
    _, loss, grads, _, saved = saved_step(model, x, y, seed=7)  # drop-path draws from the global generator
    return loss, grads, saved


@pytest.mark.parametrize(
    "method,drop_path", [("lora", 0.0), ("ssf", 0.0), ("adapter", 0.0), ("vpt_deep", 0.0), ("lora", 0.2)]
)
def test_recompute_is_bit_identical_and_saves_less(method, drop_path):
    base = _vit(drop_path)
    vpeft.apply(base, method)
    base.train()
    recomputed = copy.deepcopy(base)
    names = get_family(recomputed).recompute_blocks(recomputed)
    assert names == ["blocks.0", "blocks.1", "blocks.2"] and recomputed_names(recomputed) == names
    loss0, grads0, saved0 = _step(base)
    loss1, grads1, saved1 = _step(recomputed)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert saved1 < 0.5 * saved0, (saved1, saved0)  # only the blocks' inputs (and the stem / head) are kept


def test_recompute_leaves_names_deltas_and_merge_unchanged(tmp_path):
    plain = _vit()
    vpeft.apply(plain, "lora")
    with torch.no_grad():  # a non-zero delta, so merging changes the weights
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    recomputed = copy.deepcopy(plain)
    get_family(recomputed).recompute_blocks(recomputed)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in recomputed.named_parameters()]
    assert plain.state_dict().keys() == recomputed.state_dict().keys()
    from safetensors.torch import load_file

    a, b = (
        load_file(vpeft.save(plain, tmp_path / "a.safetensors")),
        load_file(vpeft.save(recomputed, tmp_path / "b.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, _ = _batch()
    plain.eval(), recomputed.eval()
    with torch.no_grad():
        before = plain(x)
        assert torch.equal(recomputed(x), before)  # no_grad: the blocks run as usual
    assert vpeft.merge(plain) == vpeft.merge(recomputed)
    with torch.no_grad():
        assert torch.equal(recomputed(x), plain(x))
    assert all(is_recomputed(recomputed.get_submodule(f"blocks.{i}")) for i in range(3))


def test_every_and_stop_recompute():
    model = _vit()
    assert recompute_blocks(model, [f"blocks.{i}" for i in range(3)], every=2) == ["blocks.0", "blocks.2"]
    assert recomputed_names(model) == ["blocks.0", "blocks.2"]
    assert recompute_blocks(model, ["blocks.0"]) == ["blocks.0"]  # idempotent: not checkpointed twice
    assert not isinstance(model.blocks[0].forward.forward, type(model.blocks[0].forward))
    assert stop_recompute(model) == ["blocks.0", "blocks.2"] and recomputed_names(model) == []
    assert "forward" not in vars(model.blocks[0])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=rf"every={bad!r} is invalid; expected a positive int"):
            recompute_blocks(model, ["blocks.0"], every=bad)


def _images(size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, size, size, generator=g)
    ds = TensorDataset(images, torch.randint(0, NUM_CLASSES, (16,), generator=g))
    return DataLoader(ds, batch_size=8)


@pytest.mark.parametrize("method", ["lora", "ssf"])
@pytest.mark.parametrize("memory", ["recompute", "half"])
def test_train_memory_recompute_trains_bit_identically(method, memory):
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=8, warmup_epochs=0)
    got = []
    # vit_reg_ls has 3 blocks: "half" recomputes the first ceil(3 * 2/3) = 2
    expected = {"default": [], "recompute": ["blocks.0", "blocks.1", "blocks.2"], "half": ["blocks.0", "blocks.1"]}
    for mode in ("default", memory):
        model = TINY_BACKBONES["vit_reg_ls"][0]()
        vpeft.apply(model, method)
        history = train(model, _images(28), dataclasses.replace(cfg, memory=mode), progress=False).history
        assert recomputed_names(model) == expected[mode]
        got.append((history[0]["train_loss"], [p.detach().clone() for p in model.parameters() if p.requires_grad]))
    assert got[0][0] == got[1][0]
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))


@pytest.mark.parametrize("method", ["lora", "ssf", "adapter"])
def test_half_is_bit_identical_and_saves_between(method):
    base = _vit(0.1)
    vpeft.apply(base, method)
    base.train()
    half, every = copy.deepcopy(base), copy.deepcopy(base)
    assert get_family(half).recompute_blocks(half, fraction=HALF) == ["blocks.0", "blocks.1"]
    get_family(every).recompute_blocks(every)
    (loss0, grads0, saved0), (loss1, grads1, saved1), (_, _, saved2) = _step(base), _step(half), _step(every)
    assert torch.equal(loss0, loss1) and grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert saved2 < saved1 < saved0


def test_leading_blocks():
    blocks = [f"b{i}" for i in range(12)]
    assert leading_blocks(blocks, HALF) == blocks[:8] and leading_blocks(blocks, 1.0) == blocks
    assert leading_blocks(blocks[:7], HALF) == blocks[:5]  # ceil(4.67): never fewer than 2/3
    assert leading_blocks(blocks, 0.01) == ["b0"]
    for bad in (0, -0.5, 1.5, True, "half"):
        with pytest.raises(ConfigError, match=rf"fraction={bad!r} is invalid; expected a number in \(0, 1\]"):
            leading_blocks(blocks, bad)


def test_memory_validated():
    with pytest.raises(ConfigError, match=r"TrainConfig.memory must be one of default, recompute, half, got 'low'"):
        TrainConfig(memory="low")
    with pytest.raises(ConfigError, match="memory='recompute' and grad_checkpointing=True both recompute"):
        TrainConfig(memory="recompute", grad_checkpointing=True)
    with pytest.raises(ConfigError, match="memory='half' and grad_checkpointing=True both recompute"):
        TrainConfig(memory="half", grad_checkpointing=True)
    assert TrainConfig(memory="half").memory == "half"
    assert TrainConfig.from_dict({"memory": "recompute"}).memory == "recompute"


def test_memory_recompute_on_a_model_without_a_family_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, NUM_CLASSES))
    with pytest.raises(
        ConfigError, match="memory='recompute' needs a backbone of a known family .*; Sequential is none"
    ):
        train(model, _images(), TrainConfig(epochs=1, memory="recompute"), progress=False)


def test_cli_memory_flag_is_generated_and_validated(capsys, tmp_path):
    from vpeft.cli import main

    argv = ["train", "--backbone", "test_vit", "--method", "lora", "--task", "digits", "--out", str(tmp_path / "o")]
    assert main([*argv, "--memory", "low"]) == 2
    err = capsys.readouterr().err
    assert "--memory must be one of default, recompute, half, got 'low'" in err and "Traceback" not in err
