"""Feature caching: training on cached prefix features gives the results of training the whole model."""

from __future__ import annotations

import pytest
import torch
from tiny import NUM_CLASSES, TINY_BACKBONES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vpeft
from vpeft.data import build_dataloader
from vpeft.train import TrainConfig, train
from vpeft.train.cache import cached_training_setup, frozen_split

# channels_last=False: the cached prefix runs in the model's own layout, so the uncached run must too (NHWC
# convolutions sum in another order: a 1e-5 difference that has nothing to do with caching)
CFG = TrainConfig(epochs=3, lr=1e-2, batch_size=8, warmup_epochs=1.0, log_every=0, channels_last=False)


def _data(size: int, n: int = 20, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))


def _loaders(size: int, seed: int | None):
    train_loader = build_dataloader(_data(size), batch_size=8, shuffle=True, seed=seed)
    val_loader = build_dataloader(_data(size, n=10, seed=1), batch_size=4, shuffle=False)
    return train_loader, val_loader


def _adapted(bb: str, method: str, **kwargs) -> nn.Module:
    model = TINY_BACKBONES[bb][0]()
    vpeft.apply(model, method, **kwargs)
    return model


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(bb, method, kwargs, seed, cached, **cache_kwargs):
    model = _adapted(bb, method, **kwargs)
    train_loader, val_loader = _loaders(TINY_BACKBONES[bb][1], seed)
    target = model
    if cached:
        setup = cached_training_setup(model, train_loader, val_loader, **cache_kwargs)
        target, train_loader, val_loader = setup.model, setup.train_loader, setup.val_loader
    result = train(target, train_loader, CFG, val_loader=val_loader, progress=False)
    return model, result


CASES = [
    ("vit_cls", "linear", {}, "pre_logits"),
    ("vit_reg_ls", "linear", {}, "pre_logits"),
    ("cnn_effnet", "linear", {}, "pre_logits"),
    ("vit_cls", "partial", {"k": 1}, 1),
    ("vit_reg_ls", "partial", {"k": 1}, 2),
]


@pytest.mark.parametrize("bb,method,kwargs,depth", CASES, ids=[f"{c[1]}{c[2]}@{c[0]}" for c in CASES])
@pytest.mark.parametrize("seed", [None, 7], ids=["global-rng", "loader-seed"])
def test_cached_training_equals_uncached(bb, method, kwargs, depth, seed):
    assert frozen_split(_adapted(bb, method, **kwargs)).depth == depth
    ref_model, ref = _run(bb, method, kwargs, seed, cached=False)
    model, got = _run(bb, method, kwargs, seed, cached=True)
    for key in ("train_loss", "train_top1", "val_loss", "val_top1"):
        assert [r[key] for r in got.history] == pytest.approx([r[key] for r in ref.history], rel=1e-5, abs=1e-6), key
    expected = _trained(ref_model)
    trained = _trained(model)
    assert trained.keys() == expected.keys()
    # a CNN's convolutions may pick other kernels for the cache pass's unshuffled batches than for the shuffled
    # ones under several threads: float rounding of ~5e-6 (on weights of ~0.5) after 3 epochs; ViTs are exact
    atol = 2e-5 if bb.startswith("cnn") else 1e-6
    for n in expected:
        torch.testing.assert_close(trained[n], expected[n], rtol=1e-5, atol=atol, msg=n)


def test_spills_to_disk_with_the_same_results(tmp_path):
    model, ref = _run("vit_cls", "linear", {}, 3, cached=True)
    model2, got = _run("vit_cls", "linear", {}, 3, cached=True, max_memory_bytes=0, cache_dir=tmp_path)
    assert [r["train_loss"] for r in got.history] == [r["train_loss"] for r in ref.history]
    assert list(tmp_path.glob("features-*.npy")), "the cache was written under cache_dir"
    for n, t in _trained(model).items():
        assert torch.equal(t, _trained(model2)[n])


def test_disk_cache_flag_and_cleanup():
    model = _adapted("vit_cls", "partial", k=1)
    train_loader, _ = _loaders(32, 0)
    setup = cached_training_setup(model, train_loader, max_memory_bytes=0)
    assert setup.on_disk and setup.depth == 1 and setup.val_loader is None
    path = setup.train_loader.dataset.path
    assert path.is_file()
    features, target = setup.train_loader.dataset[3]
    assert features.shape == (17, 32) and int(target) == int(train_loader.dataset[3][1])
    del setup
    import gc

    gc.collect()
    assert not path.exists(), "a temporary cache is removed with its dataset"


@pytest.mark.parametrize("method,kwargs", [("lora", {}), ("vpt_deep", {}), ("bitfit", {}), ("ln_tune", {})])
def test_methods_touching_the_first_block_are_refused(method, kwargs):
    model = _adapted("vit_cls", method, **kwargs)
    assert frozen_split(model) is None
    with pytest.raises(vpeft.ConfigError, match="nothing to cache"):
        cached_training_setup(model, DataLoader(_data(32), batch_size=4))


def test_random_layers_in_the_prefix_are_refused():
    model = _adapted("vit_cls", "linear")
    model.blocks[0].drop_path1 = nn.Dropout(0.1)  # stands in for any stochastic layer
    split = frozen_split(model)
    assert split is None


def test_the_suffix_trains_the_original_tensors(tmp_path):
    model, _ = _run("vit_cls", "partial", {"k": 1}, 0, cached=True)
    path = vpeft.save(model, tmp_path / "delta.safetensors")
    fresh = TINY_BACKBONES["vit_cls"][0]()
    vpeft.load(fresh, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


# ---- on by default in finetune (vpeft train / bench), where exact --------------------------------------------
def _finetune(tmp_path, method, **train):
    from vpeft.data import ensure_digits_task
    from vpeft.run import finetune

    ensure_digits_task(tmp_path)
    return finetune(
        backbone="test_vit",
        method=method,
        task="digits",
        data_root=tmp_path,
        train_cfg=TrainConfig(epochs=2, lr=1e-2, batch_size=32, **train),
        img_size=32,
        train_split="val200",
        eval_split="val200",
        pretrained=False,
        progress=False,
    )


@pytest.mark.parametrize("method", ["linear", {"method": "partial", "k": 1}], ids=["linear", "partial1"])
def test_finetune_caches_by_default_with_identical_results(tmp_path, method):
    cached, uncached = _finetune(tmp_path, method), _finetune(tmp_path, method, feature_cache=False)
    assert cached.feature_cache is not None and uncached.feature_cache is None
    assert cached.metrics == uncached.metrics
    assert cached.final_train == uncached.final_train


def test_finetune_does_not_cache_what_the_method_changes(tmp_path):
    assert _finetune(tmp_path, "lora").feature_cache is None
